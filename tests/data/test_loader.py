"""BatchLoader: windows and their shift, seeding, DDP ranks, sequential epochs, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pagoda.data.loader import BatchLoader
from pagoda.data.shards import ShardError, ShardWriter, TokenShards, write_index


@pytest.fixture
def shards(tmp_path):
    """A 1000-token split 0, 1, 2, ... spread over several files."""
    with ShardWriter(tmp_path, "train", "uint16", shard_tokens=300) as writer:
        writer.write(np.arange(1000) % 500, documents=1)
    write_index(tmp_path, dtype="uint16", vocab_size=500, eot_id=None, tokenizer=None,
                splits={"train": writer.entry()})
    return TokenShards.open(tmp_path)


def test_windows_and_targets(shards):
    x, y = BatchLoader(shards, block_size=8, batch_size=5, seed=1).next()
    assert x.shape == y.shape == (5, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x[:, :1] + torch.arange(8)) % 500, x)  # consecutive ids of the stream


def test_seeded_and_distinct_per_rank(shards):
    def first(seed, rank=0):
        return BatchLoader(shards, 8, 4, seed=seed, rank=rank, world_size=2).next()[0]

    assert torch.equal(first(1), first(1))
    assert not torch.equal(first(1), first(2))
    assert not torch.equal(first(1, rank=0), first(1, rank=1))


def test_sequential_walks_consecutive_windows_split_over_ranks(shards):
    ranks = [BatchLoader(shards, 10, 3, mode="sequential", rank=r, world_size=2) for r in (0, 1)]
    starts = [int(x[i, 0]) for _ in range(2) for loader in ranks for x in [loader.next()[0]]
              for i in range(3)]
    assert starts == list(range(0, 120, 10))  # every window once, no rank overlap
    loader = BatchLoader(shards, 100, 4, mode="sequential")
    for _ in range(3):
        loader.next()
    assert loader.epoch == 1  # 9 windows per epoch, 12 drawn


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_state_dict_resumes_exactly(shards, mode):
    loader = BatchLoader(shards, 8, 4, seed=3, mode=mode)
    loader.next()
    state = json.loads(json.dumps(loader.state_dict()))  # it is saved as plain data
    expected = [loader.next()[0] for _ in range(3)]
    resumed = BatchLoader(shards, 8, 4, seed=99, mode=mode)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next()[0]) for a in expected)


def test_too_short_split(shards):
    with pytest.raises(ShardError, match="needs block_size \\+ 1 = 1001"):
        BatchLoader(shards, block_size=1000, batch_size=1)
