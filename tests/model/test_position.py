"""Positional encodings: RoPE (plain and Llama-3 scaled), and the original sinusoids."""

import math

import pytest
import torch

from pagoda.model.config import ModelConfig
from pagoda.model.position import apply_rope, rope_frequencies, rope_table, sinusoidal_table

HD = 16


def rope_cfg(**kw) -> ModelConfig:
    return ModelConfig(d_model=4 * HD, n_head=4, d_ff=64, max_seq_len=512, **kw)


def rotate(x: torch.Tensor, pos: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """apply_rope for x (B, H, T, hd) at absolute positions pos (T,)."""
    cos, sin = rope_table(cfg)
    return apply_rope(x, cos[pos][None, None], sin[pos][None, None])


def test_rope_table_shape_and_position_zero_is_identity():
    cfg = rope_cfg()
    cos, sin = rope_table(cfg)
    assert cos.shape == sin.shape == (512, HD)
    x = torch.randn(1, 2, 1, HD)
    torch.testing.assert_close(rotate(x, torch.tensor([0]), cfg), x)


def test_rope_is_a_pairwise_rotation_by_position_times_frequency():
    cfg = rope_cfg(rope_theta=10000.0)
    x = torch.randn(HD)
    pos = 37
    y = rotate(x.view(1, 1, 1, HD), torch.tensor([pos]), cfg).view(HD)
    for i in range(HD // 2):  # "rotate half": dimension i pairs with i + hd/2
        angle = pos * 10000.0 ** (-2 * i / HD)
        a, b = x[i].item(), x[i + HD // 2].item()
        assert y[i].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-4)
        assert y[i + HD // 2].item() == pytest.approx(a * math.sin(angle) + b * math.cos(angle),
                                                      abs=1e-4)


def test_rope_preserves_the_norm():
    cfg = rope_cfg()
    x = torch.randn(2, 3, 50, HD)
    y = rotate(x, torch.arange(100, 150), cfg)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    cfg = rope_cfg()
    q, k = torch.randn(1, 1, 1, HD), torch.randn(1, 1, 1, HD)

    def score(m: int, n: int) -> float:
        qm = rotate(q, torch.tensor([m]), cfg)
        kn = rotate(k, torch.tensor([n]), cfg)
        return (qm * kn).sum().item()

    for m, n in [(5, 2), (105, 102), (300, 297)]:
        assert score(m, n) == pytest.approx(score(3, 0), abs=1e-3)
    assert abs(score(9, 2) - score(3, 0)) > 1e-3  # a different distance gives another score


def test_llama3_scaling_keeps_high_and_divides_low_frequencies():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    plain = rope_frequencies(rope_cfg(rope_theta=500000.0))
    scaled = rope_frequencies(rope_cfg(rope_theta=500000.0, rope_scaling=scaling))
    wavelen = 2 * math.pi / plain
    high = wavelen < 64 / 4.0  # shorter than original context / high_freq_factor
    low = wavelen > 64 / 1.0
    assert high.any() and low.any()
    torch.testing.assert_close(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8.0)
    mid = ~high & ~low
    assert ((scaled[mid] <= plain[mid]) & (scaled[mid] >= plain[mid] / 8.0)).all()


def test_llama3_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    ours = rope_frequencies(ModelConfig.from_name("llama3.2-1b"))
    hf_cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                          **scaling})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)


def test_sinusoidal_table_matches_the_paper():
    d = 32
    table = sinusoidal_table(100, d)
    assert table.shape == (100, d)
    for pos in (0, 1, 17, 99):
        for i in (0, 3, 15):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_sinusoidal_table_with_odd_width():
    table = sinusoidal_table(10, 5)
    assert table.shape == (10, 5)
    assert table[3, 4].item() == pytest.approx(math.sin(3 / 10000 ** (4 / 5)), abs=1e-5)


def test_gguf_freq_factors_divide_the_frequencies():
    cfg = ModelConfig.from_name("tiny-llama")
    half = cfg.dim_head // 2
    plain = rope_frequencies(cfg)
    factors = [1.0] * (half // 2) + [4.0] * (half - half // 2)
    scaled = rope_frequencies(cfg.replace(rope_scaling={"freq_factors": factors}))
    torch.testing.assert_close(scaled, plain / torch.tensor(factors))
