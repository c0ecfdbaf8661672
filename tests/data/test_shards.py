"""Token shards: rolling files, reads across file ends, atomic writes, damaged folders."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from pagoda.data.shards import INDEX, ShardError, ShardWriter, TokenShards, token_dtype, write_index


def make(folder, ids, shard_tokens=7, dtype="uint16", vocab_size=100, eot_id=None):
    with ShardWriter(folder, "train", dtype, shard_tokens) as writer:
        writer.write(ids[:10], documents=1)
        writer.write(ids[10:], documents=1)
    return write_index(folder, dtype=dtype, vocab_size=vocab_size, eot_id=eot_id,
                       splits={"train": writer.entry()})


def test_dtype_follows_vocab_size():
    assert token_dtype(65) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(151_936) == np.uint32


@pytest.mark.parametrize("dtype, top", [("uint16", 65535), ("uint32", 100_000)])
def test_reads_cross_file_ends_as_one_stream(tmp_path, dtype, top):
    ids = np.arange(23) * (top // 22)
    index = make(tmp_path, ids, dtype=dtype, vocab_size=top + 1)
    split = index["splits"]["train"]
    assert [f["tokens"] for f in split["files"]] == [7, 7, 7, 2]
    assert split["tokens"] == 23 and split["documents"] == 2
    shards = TokenShards.open(tmp_path)
    assert len(shards) == shards.tokens == 23 and shards.dtype == np.dtype(dtype)
    assert shards.tokenizer_path == tmp_path / "tokenizer.json" and shards.eot_id is None
    for start in range(23):
        for length in range(23 - start + 1):
            got = shards.read(start, length)
            assert got.dtype == np.int64 and got.tolist() == ids[start:start + length].tolist()
    with pytest.raises(IndexError):
        shards.read(20, 4)
    assert pickle.loads(pickle.dumps(shards)).read(5, 10).tolist() == ids[5:15].tolist()


def test_index_and_files_are_written_whole_or_not_at_all(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "train", "uint16", 4) as writer:
            writer.write(np.arange(10))
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    make(tmp_path, np.arange(12))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        INDEX, "train-00000.bin", "train-00001.bin"]


def damage(folder, how):
    index = json.loads((folder / INDEX).read_text())
    if how == "no-index":
        (folder / INDEX).unlink()
    elif how == "truncated":
        (folder / "train-00001.bin").write_bytes(b"\0\0")
    elif how == "missing-bin":
        (folder / "train-00000.bin").unlink()
    else:
        index[how] = {"format": "other", "version": 2, "dtype": "float32"}[how]
        (folder / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("how, match", [
    ("no-index", "no index.json"), ("truncated", "the folder is damaged"),
    ("missing-bin", "listed in index.json but missing"), ("format", "not a pagoda-token-shards"),
    ("version", "format version 2"), ("dtype", "unsupported dtype 'float32'"),
])
def test_damaged_folders_are_one_clear_error(tmp_path, how, match):
    make(tmp_path, np.arange(12))
    damage(tmp_path, how)
    with pytest.raises(ShardError, match=match):
        TokenShards.open(tmp_path)


def test_missing_folder_and_split(tmp_path):
    with pytest.raises(ShardError, match="no such token-shard folder"):
        TokenShards.open(tmp_path / "nope")
    make(tmp_path, np.arange(12))
    with pytest.raises(ShardError, match="no split 'val'.*it has train"):
        TokenShards.open(tmp_path, "val")
