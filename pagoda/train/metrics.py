"""What a run reports: a JSONL metrics log, a loss-curve PNG and model FLOPs utilisation.

MFU (PaLM, appendix B) = achieved model FLOP/s / the hardware's peak. Model FLOPs per token are
6·N (forward + backward through N weights) + 12·L·T·d (attention scores and values), with N the
parameters excluding position tables. The peak comes from `train.peak_flops`, else a table of
dense bf16 tensor-core peaks for known GPUs, else (CPU) one fp32 matmul measured at start-up.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from pagoda.model.transformer import Transformer

# Dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name() (vendor data sheets).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                  "A10G": 125e12, "L4": 121e12, "4090": 165e12, "V100": 125e12}


def flops_per_token(model: Transformer, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·T·d."""
    cfg = model.cfg
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("pos_embed"))
    return 6 * n + 12 * cfg.n_layer * seq_len * cfg.d_model


def peak_flops(device: torch.device, configured: float | None = None) -> float:
    """The peak FLOP/s MFU divides by (see the module docstring for the order of sources)."""
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
        warnings.warn(f"unknown GPU {name!r}: MFU uses the A100's 312 TFLOP/s; set "
                      "train.peak_flops", stacklevel=2)
        return GPU_PEAK_FLOPS["A100"]
    return measured_cpu_flops()


def measured_cpu_flops(n: int = 512, repeats: int = 8) -> float:
    """fp32 matmul FLOP/s of this CPU (all torch threads), best of a few runs."""
    generator = torch.Generator().manual_seed(0)  # leaves the training RNG untouched
    a, b = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


class MetricsLog:
    """Append-only `metrics.jsonl`: one JSON object per logged step (rank 0 only)."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.unlink(missing_ok=True)
        else:  # drop records written after the checkpoint we resume from
            kept = [r for r in self.records() if r["step"] <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def plot_losses(records: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Train and validation loss against step as a PNG; None (with a warning) without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss-curve PNG", stacklevel=2)
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    for points, label in ((train, "train"), (val, "validation")):
        if points:
            ax.plot(*zip(*points, strict=True), label=label, marker="o" if label != "train" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
