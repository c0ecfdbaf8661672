"""Tiny char-level shards and run configs shared by the trainer tests (seconds, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pagoda.data.tokenize import tokenize_corpus
from pagoda.tokenizer.train import train_tokenizer
from pagoda.train.config import PretrainConfig, load_config

TEXT = "the quick brown fox jumps over the lazy dog. " * 60
TORCHRUN = Path(sys.executable).with_name("torchrun")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def char_shards(tmp_path_factory) -> Path:
    """A character-level shard folder (train + val) of a repeated sentence."""
    root = tmp_path_factory.mktemp("corpus")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    train_tokenizer([corpus], None, root / "tok", kind="char", held_out_fraction=0.0)
    tokenize_corpus([corpus], root / "tok", root / "shards", val_fraction=0.1, workers=1)
    return root / "shards"


def make_config(shards: Path, out_dir: Path, **sections) -> PretrainConfig:
    """A 2-layer d=32 GPT on `shards`, run for 8 steps; `sections` update its sections."""
    data = {
        "model": {"preset": "baby-gpt", "n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64,
                  "max_seq_len": 32, "dropout": 0.1},
        "data": {"shards": str(shards), "block_size": 16, "batch_size": 4},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2, "min_lr": 3e-4},
        "train": {"max_steps": 8, "eval_every": 4, "eval_batches": 2, "out_dir": str(out_dir),
                  "progress": False, "device": "cpu"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return load_config(data=data)


@pytest.fixture(scope="session")
def tiny_config():
    """`make_config`, for tests (conftest modules are not importable under importlib mode)."""
    return make_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine spinning threads cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def torchrun() -> Callable[..., subprocess.CompletedProcess]:
    """Run `torchrun --standalone --nproc-per-node 2 ARGS...` from the repository (gloo, CPU).

    Workers should free their models, DTensors and meshes before `destroy_process_group()`:
    objects left for interpreter teardown can abort a rank after its work is done."""
    if not TORCHRUN.exists():
        pytest.skip("torchrun is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *args],
                              capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    return run
