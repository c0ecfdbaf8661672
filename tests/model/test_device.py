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


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = {  # one small model of each family: the switches differ, not the code
    "tiny-llama": {},  # RoPE, GQA, RMSNorm, SwiGLU
    "tiny-moe": {},  # mixture-of-experts FFN
    "gpt2": dict(n_layer=2, d_model=64, n_head=4, d_ff=256, vocab_size=512, max_seq_len=128),
    "minilm-l6": dict(n_layer=2, d_model=64, n_head=4, d_ff=256, vocab_size=512),  # encoder
}


@needs_cuda
@pytest.mark.parametrize("preset", SMALL)
def test_cuda_forward_matches_cpu_float64(preset, monkeypatch):
    """The same weights on the GPU give the float64 CPU logits: fp32 (TF32 off) to rounding,
    bf16 autocast to bf16's precision."""
    from pagoda.model.config import ModelConfig
    from pagoda.model.transformer import Transformer

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(preset, **SMALL[preset])).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (3, 40))
    with torch.no_grad():
        ref = model.double()(ids)
        gpu = model.float().cuda()
        fp32 = gpu(ids.cuda()).double().cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = gpu(ids.cuda()).double().cpu()

    def error(out):
        return ((out - ref).norm() / ref.norm()).item()

    assert error(fp32) < 1e-5
    assert error(bf16) < 3e-2
