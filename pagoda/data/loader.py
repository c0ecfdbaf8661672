"""Batches for language-model training, cut from a token stream (`TokenShards`).

Each batch is B windows of T + 1 ids: x = the first T, y = the last T (x shifted by one).
Two modes: "random" draws window starts from a seeded numpy generator (nanoGPT's get_batch);
"sequential" walks consecutive windows epoch by epoch. Under DDP every rank gets different
windows (the rank is part of the seed, or of the stride). `state_dict()` is plain JSON, saved
in checkpoints, so a resumed run draws exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from pagoda.data.shards import ShardError, TokenShards


class BatchLoader:
    """`next()` -> (x, y) int64 tensors of shape (batch_size, block_size)."""

    def __init__(self, shards: TokenShards, block_size: int, batch_size: int, seed: int = 0,
                 mode: Literal["random", "sequential"] = "random", rank: int = 0,
                 world_size: int = 1) -> None:
        if shards.tokens < block_size + 1:
            raise ShardError(f"split {shards.split!r} of {shards.folder} has {shards.tokens} "
                             f"tokens; a batch window needs block_size + 1 = {block_size + 1}")
        if mode not in ("random", "sequential"):
            raise ValueError(f"unknown loader mode {mode!r}")
        self.shards, self.block_size, self.batch_size = shards, block_size, batch_size
        self.mode, self.rank, self.world_size = mode, rank, world_size
        self.rng = np.random.default_rng([seed, rank])
        self.windows = (shards.tokens - 1) // block_size  # sequential windows per epoch
        self.position = 0  # sequential: global index of the next window
        self.epoch = 0

    def _starts(self) -> np.ndarray:
        """Token offsets of this rank's next batch_size windows."""
        if self.mode == "random":
            return self.rng.integers(0, self.shards.tokens - self.block_size,
                                     size=self.batch_size)
        base = self.position + self.rank * self.batch_size  # ranks take adjacent slices
        index = np.arange(base, base + self.batch_size)
        self.position += self.world_size * self.batch_size
        self.epoch = self.position // self.windows
        return (index % self.windows) * self.block_size

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch (x, y) on the CPU."""
        windows = np.stack([self.shards.read(int(s), self.block_size + 1)
                            for s in self._starts()])
        batch = torch.from_numpy(windows)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is: the generator's state or the window position (JSON-able)."""
        return {"mode": self.mode, "rng": self.rng.bit_generator.state,
                "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`."""
        self.rng.bit_generator.state = state["rng"]
        self.position, self.epoch = state["position"], state["epoch"]
