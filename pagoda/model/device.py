"""Pick the device and compute dtype: bf16 where the hardware has fast bf16, fp32 elsewhere.

CPUs without AVX-512-BF16/AMX run torch's bf16 matmul one to two orders of magnitude slower than
fp32 (measured here: ~1-20 GFLOP/s against ~180), so such CPUs compute in fp32.
"""

from functools import lru_cache
from pathlib import Path

import torch

from pagoda.errors import ConfigError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether /proc/cpuinfo advertises AMX-BF16 or AVX-512-BF16."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_device(name: str | None = None) -> torch.device:
    """The requested device, else CUDA when available, else CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is available")
    return device


def pick_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """The requested dtype, else the fastest accurate one for this device."""
    if name not in (None, "auto"):
        if name not in DTYPES:
            raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
