"""Group-wise int8/int4 weights: packing, error bounds, a tiny model's logits, state_dict
round trips, and QLoRA (LoRA trained over a frozen quantized base)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagoda.errors import ConfigError
from pagoda.model.config import ModelConfig
from pagoda.model.lora import LoraConfig, add_lora, lora_parameters
from pagoda.model.quantized import (
    QuantizedLinear,
    dequantize_weight,
    pack_int4,
    quantize_linears,
    quantize_weight,
    unpack_int4,
    weight_storage,
)
from pagoda.model.transformer import Transformer

VOCAB = 300


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny-llama", vocab_size=VOCAB, d_ff=128, n_kv_head=2)
    return Transformer(cfg).eval()


def ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_int4_pack_unpack_round_trip():
    every = torch.arange(-8, 8, dtype=torch.int8)
    q = torch.stack([every, every.flip(0), every.roll(3)])  # (3, 16): each value at odd/even
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 8)
    assert torch.equal(unpack_int4(packed), q)
    assert packed[0, 0].item() == (-8 + 8) | ((-7 + 8) << 4)  # even in the low nibble
    with pytest.raises(ConfigError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantization_error_is_at_most_half_a_step(bits):
    torch.manual_seed(0)
    w = torch.randn(24, 96) * torch.logspace(-2, 1, 96)  # groups of very different magnitude
    w[3, :32] = 0.0  # an all-zero group must not divide by zero
    q, scales = quantize_weight(w, bits, group_size=32)
    assert scales.shape == (24, 3)
    qmax = 7 if bits == 4 else 127
    absmax = w.view(24, 3, 32).abs().amax(-1)
    assert torch.allclose(scales, absmax / qmax)
    back = dequantize_weight(q, scales, bits, torch.float32)
    error = (back - w).abs().view(24, 3, 32)
    assert (error <= scales.unsqueeze(-1) / 2 + 1e-6).all()
    assert torch.equal(back[3, :32], torch.zeros(32))
    # the largest entry of each group is exact (it maps to +-qmax)
    assert torch.allclose(back.view(24, 3, 32).abs().amax(-1), absmax, rtol=1e-6)


@pytest.mark.parametrize("bits, storage, cols", [(8, torch.int8, 64), (4, torch.uint8, 32)])
def test_from_linear_stores_integers_and_keeps_float_bias(bits, storage, cols):
    torch.manual_seed(0)
    linear = nn.Linear(64, 10, bias=True)
    layer = QuantizedLinear.from_linear(linear, bits=bits, group_size=16)
    assert layer.qweight.dtype == storage and layer.qweight.shape == (10, cols)
    assert list(layer.parameters()) == []  # nothing trainable
    assert torch.equal(layer.bias, linear.bias.detach())
    x = torch.randn(5, 64)
    expected = linear(x)
    tolerance = 0.05 if bits == 8 else 0.3
    assert (layer(x) - expected).abs().max().item() < tolerance * expected.abs().max().item()
    assert torch.allclose(layer(x), layer.to_linear()(x), atol=1e-5)
    assert layer(x.double()).dtype == torch.float64  # dequantizes into the input's dtype
    fp32_bytes = 64 * 10 * 4
    assert layer.dense_weight_bytes() == fp32_bytes
    assert layer.weight_bytes() == 64 * 10 * bits // 8 + 10 * 4 * 4  # integers + scales


def test_bad_quantization_arguments():
    linear = nn.Linear(48, 8)
    with pytest.raises(ConfigError, match="bits must be 4 or 8"):
        QuantizedLinear.from_linear(linear, bits=3)
    with pytest.raises(ConfigError, match="does not divide in_features 48"):
        QuantizedLinear.from_linear(linear, bits=8, group_size=32)
    with pytest.raises(ConfigError, match="even"):
        QuantizedLinear.from_linear(linear, bits=4, group_size=3)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-llama", vocab_size=VOCAB, d_ff=96))
    with pytest.raises(ConfigError, match=r"in_features 96 \(layers\.0\.ffn\.down_proj\)"):
        quantize_linears(model, bits=4, group_size=64)  # divides d_model 64, not d_ff 96
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # all or nothing


@pytest.mark.parametrize("bits, tolerance", [(8, 0.02), (4, 0.25)])
def test_tiny_model_logits_stay_close(bits, tolerance):
    model = tiny()
    x = ids(2, 12)
    with torch.no_grad():
        expected = model(x)
    names = quantize_linears(model, bits=bits, group_size=32)
    assert len(names) == 2 * 7 and "lm_head" not in names  # tied to the embedding: skipped
    assert model.lm_head.weight is model.embed.weight
    with torch.no_grad():
        got = model(x)
    error = (got - expected).abs().max().item()
    assert 0 < error < tolerance * expected.abs().max().item()
    stored, dense = weight_storage(model)
    assert stored < dense * (0.3 if bits == 8 else 0.2)


def test_skip_and_untied_lm_head():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-llama", vocab_size=VOCAB, d_ff=128, tie_embeddings=False)
    model = Transformer(cfg)
    assert "lm_head" not in quantize_linears(model, bits=8, group_size=64)
    model = Transformer(cfg)
    names = quantize_linears(model, bits=8, group_size=64, skip=("down_proj",))
    assert "lm_head" in names and not any(n.endswith("down_proj") for n in names)


def test_quantized_state_dict_round_trips():
    model = tiny()
    quantize_linears(model, bits=4, group_size=32)
    state = model.state_dict()
    assert state["layers.0.attn.q_proj.qweight"].dtype == torch.uint8
    other = tiny(seed=1)
    quantize_linears(other, bits=4, group_size=32)
    other.load_state_dict(state)
    x = ids(1, 9)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def test_qlora_trains_only_the_adapter_and_lowers_the_loss():
    model = tiny()
    quantize_linears(model, bits=4, group_size=32)
    add_lora(model, LoraConfig(r=8, alpha=16.0, dropout=0.0))
    params = lora_parameters(model)
    assert [p for p in model.parameters() if p.requires_grad] == params
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    initial = [p.detach().clone() for p in params]
    model.train()
    x = ids(4, 16, seed=5)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model.loss(x[:, :-1], x[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in params)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(not torch.equal(p, p0) for p, p0 in zip(params, initial, strict=True))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # base weights untouched


def test_backward_recomputes_the_weight_instead_of_saving_it():
    """Input gradients equal the dense layer's, and autograd keeps no float copy of W alive."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    q = QuantizedLinear.from_linear(linear, bits=4, group_size=32)
    x = torch.randn(3, 5, 128, requires_grad=True)
    dense_x = x.detach().clone().requires_grad_()
    saved: list[int] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = q(x)
    y.square().sum().backward()
    reference = F.linear(dense_x, q.dequantize(), q.bias)
    reference.square().sum().backward()
    torch.testing.assert_close(y, reference)
    torch.testing.assert_close(x.grad, dense_x.grad)
    assert sum(saved) < q.dense_weight_bytes()  # nothing of W's size waits for backward
