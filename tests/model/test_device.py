"""Device and dtype choice: fp32 on CPUs without fast bf16, explicit names honoured."""

import pytest
import torch

from pagoda.errors import ConfigError
from pagoda.model import device as device_mod
from pagoda.model.device import DTYPES, cpu_has_fast_bf16, pick_device, pick_dtype

CPU = torch.device("cpu")


def test_this_cpu_computes_in_fp32():
    flags = open("/proc/cpuinfo").read()
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        pytest.skip("this CPU has fast bf16")
    assert not cpu_has_fast_bf16()
    assert pick_dtype(CPU) is torch.float32
    assert pick_dtype(CPU, "auto") is torch.float32


def test_fast_bf16_cpus_get_bf16(monkeypatch):
    monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: True)
    assert pick_dtype(CPU) is torch.bfloat16


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("float32", torch.float32),
                                         ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                         ("fp16", torch.float16), ("float16", torch.float16)])
def test_explicit_dtype_names(name, dtype):
    assert pick_dtype(CPU, name) is dtype
    assert DTYPES[name] is dtype


def test_unknown_dtype_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        pick_dtype(CPU, "int3")
    assert "unknown dtype 'int3'" in str(err.value) and "bf16" in str(err.value)


def test_pick_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == expected and pick_device("auto").type == expected
    assert pick_device("cpu") == CPU


def test_unknown_device_is_a_readable_error():
    with pytest.raises(ConfigError, match="unknown device 'tpu9'"):
        pick_device("tpu9")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_readable_error():
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        pick_device("cuda")


def test_cuda_dtype_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype(torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_dtype(torch.device("cuda")) is torch.float16
