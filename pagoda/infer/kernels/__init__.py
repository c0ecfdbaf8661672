"""Native CPU kernels for decoding, compiled on first use (torch's C++ extension builder).

`skinny_linear` computes x @ w.T (+ b) for inputs of 1-64 rows — every decode step of a batch — splitting the
weight rows over torch's thread pool; MKL runs these shapes on one thread at about half the
memory bandwidth. `rms_norm` and `rope_` replace a dozen small torch ops each, whose dispatch
overhead adds up to a sixth of a decode step. The model keeps its readable PyTorch code:
`use_native_kernels` swaps in subclasses that call the kernels only for no-grad fp32 CPU
inputs, and anything else, or a machine where the build fails, runs the original forward.
"""

from __future__ import annotations

import logging
import os
import platform
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.model.attention import Attention, Rotary
from pagoda.model.norm import RMSNorm
from pagoda.paths import pagoda_home

log = logging.getLogger(__name__)
MAX_ROWS = 64
_SOURCE = Path(__file__).with_name("gemv_cpu.cpp")


@lru_cache(maxsize=1)
def native_available() -> bool:
    """Build (once, cached under $PAGODA_HOME/kernels) and load the kernels; False if impossible."""
    if os.environ.get("PAGODA_NO_KERNELS") or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        if "avx2" not in Path("/proc/cpuinfo").read_text():
            return False
        from torch.utils.cpp_extension import load

        build = pagoda_home() / "kernels" / f"torch-{torch.__version__}"
        build.mkdir(parents=True, exist_ok=True)
        load(name="pagoda_kernels", sources=[str(_SOURCE)], build_directory=str(build),
             extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
        return True
    except Exception as exc:  # no compiler, no ninja, unusual platform: stay correct, just slower
        log.warning("native decode kernels unavailable, using torch's linear (%s)", exc)
        return False


def _native(x: torch.Tensor) -> bool:
    """Whether this call may take a kernel: fp32 on CPU, no autograd."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


class SkinnyLinear(nn.Linear):
    """nn.Linear whose few-row calls go to the native kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > MAX_ROWS or not _native(x):
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.pagoda_kernels.skinny_linear(x.reshape(rows, self.in_features),
                                                   self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


class NativeRMSNorm(RMSNorm):
    """RMSNorm computed by one kernel call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _native(x):
            return super().forward(x)
        return torch.ops.pagoda_kernels.rms_norm(x, self.weight, self.eps)


class NativeRotary(Rotary):
    """RoPE applied in place to the fresh q/k projections by one kernel call each."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not _native(q) or q.stride(-1) != 1 or k.stride(-1) != 1:
            return super().forward(q, k, cos, sin)
        torch.ops.pagoda_kernels.rope_(q, cos, sin)
        torch.ops.pagoda_kernels.rope_(k, cos, sin)
        return q, k


class NativeAttention(Attention):
    """Attention whose one-token decode steps run the native kernel over the cached keys."""

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        if q.shape[2] != 1 or not _native(q) or not self.causal:
            return super()._attend(q, k, v, mask)
        return torch.ops.pagoda_kernels.decode_attention(q, k, v, mask)


_SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: SkinnyLinear, RMSNorm: NativeRMSNorm, Rotary: NativeRotary,
    Attention: NativeAttention}


def use_native_kernels(model: nn.Module) -> nn.Module:
    """Swap in the kernel-backed subclasses (same parameters, same results) when kernels load."""
    if next(model.parameters()).device.type != "cpu" or not native_available():
        return model
    for module in model.modules():
        if type(module) in _SWAPS:
            module.__class__ = _SWAPS[type(module)]
    return model
