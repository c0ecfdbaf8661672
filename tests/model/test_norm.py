"""RMSNorm and LayerNorm: reference formulas, dtype handling, and the config switch."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagoda.model.config import ModelConfig
from pagoda.model.norm import RMSNorm, build_norm
from pagoda.model.transformer import Transformer


def rms_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y_i = x_i / sqrt(mean_j x_j^2 + eps) * w_i, computed in float64."""
    x64 = x.double()
    return (x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + eps) * weight.double()).float()


def test_rmsnorm_matches_the_formula_and_torch():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16) * 4
    y = norm(x)
    torch.testing.assert_close(y, rms_reference(x, norm.weight, 1e-6), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, F.rms_norm(x, (16,), norm.weight, eps=1e-6), rtol=1e-5,
                               atol=1e-6)


def test_rmsnorm_output_has_unit_rms_with_unit_weight():
    x = torch.randn(4, 32) * 10 + 3
    y = RMSNorm(32, eps=0.0)(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(RMSNorm(32)(x * 7), RMSNorm(32)(x), rtol=1e-4, atol=1e-5)


def test_rmsnorm_eps_matters_for_small_inputs():
    x = torch.full((1, 8), 1e-3)
    assert RMSNorm(8, eps=0.0)(x)[0, 0].item() == pytest.approx(1.0, rel=1e-4)
    assert RMSNorm(8, eps=1e-5)(x)[0, 0].item() == pytest.approx(1e-3 / (1e-6 + 1e-5) ** 0.5,
                                                                  rel=1e-4)


def test_rmsnorm_keeps_low_precision_dtype_but_computes_in_fp32():
    x = torch.randn(2, 64) * 100
    y = RMSNorm(64).bfloat16()(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), RMSNorm(64)(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


def test_build_norm_follows_the_config():
    rms = build_norm(ModelConfig(d_model=32, n_head=4, d_ff=64, norm="rmsnorm", norm_eps=1e-6))
    assert isinstance(rms, RMSNorm) and rms.eps == 1e-6 and rms.weight.shape == (32,)
    ln = build_norm(ModelConfig(d_model=32, n_head=4, d_ff=64, norm="layernorm", norm_eps=1e-6))
    assert isinstance(ln, nn.LayerNorm) and ln.eps == 1e-6 and ln.bias.shape == (32,)
    x = torch.randn(2, 32)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (32,), eps=1e-6))


def test_layernorm_post_norm_model_builds_and_ends_normalised():
    cfg = ModelConfig.from_name("transformer-base", vocab_size=100, max_seq_len=32, d_model=32,
                                n_layer=2, n_head=4, d_ff=64, dropout=0.0)
    model = Transformer(cfg).eval()
    assert model.final_norm is None
    assert all(isinstance(b.attn_norm, nn.LayerNorm) and not b.pre_norm for b in model.layers)
    captured = {}
    model.layers[-1].register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    logits = model(torch.randint(0, 100, (2, 7)))
    assert logits.shape == (2, 7, 100)
    h = captured["h"]  # post-norm: the last block's output is LayerNorm'ed (weight 1, bias 0)
    torch.testing.assert_close(h.mean(-1), torch.zeros(2, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.var(-1, unbiased=False), torch.ones(2, 7), atol=1e-3, rtol=0)
