"""Native CPU kernels for decoding, compiled on first use (torch's C++ extension builder).

`skinny_linear` computes x @ w.T (+ b) for inputs of 1-8 rows — every decode step — splitting the
weight rows over torch's thread pool; MKL runs these shapes on one thread at about half the
memory bandwidth. Anything else, or a machine where the build fails, uses `F.linear`.
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

from pagoda.paths import pagoda_home

log = logging.getLogger(__name__)
MAX_ROWS = 8
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


class SkinnyLinear(nn.Linear):
    """nn.Linear whose few-row, no-grad fp32 CPU calls go to the native kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (rows > MAX_ROWS or x.device.type != "cpu" or x.dtype != torch.float32
                or torch.is_grad_enabled()):
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.pagoda_kernels.skinny_linear(x.reshape(rows, self.in_features),
                                                   self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def use_native_kernels(model: nn.Module) -> nn.Module:
    """Switch the model's Linear layers to `SkinnyLinear` (same parameters) when kernels load."""
    if next(model.parameters()).device.type != "cpu" or not native_available():
        return model
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SkinnyLinear
    return model
