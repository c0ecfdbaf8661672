"""Native decode kernel: same numbers as F.linear, used only where it applies, weights stay tied."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagoda.infer import kernels
from pagoda.infer.kernels import SkinnyLinear, native_available, use_native_kernels
from pagoda.model.config import ModelConfig
from pagoda.model.kv_cache import KVCache
from pagoda.model.transformer import Transformer

needs_native = pytest.mark.skipif(not native_available(), reason="native kernels did not build")


def skinny(x, w, b=None):
    return torch.ops.pagoda_kernels.skinny_linear(x, w, b)


@needs_native
@pytest.mark.parametrize("rows", [*range(1, 10), 16, 23, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_matches_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    for k, n in [(1, 3), (7, 5), (13, 33), (64, 128), (100, 257), (576, 96)]:
        x = torch.randn(rows, k, generator=g)
        w = torch.randn(n, k, generator=g)
        b = torch.randn(n, generator=g) if bias else None
        torch.testing.assert_close(skinny(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-4)


@needs_native
def test_skinny_linear_non_contiguous_inputs_and_errors():
    x = torch.randn(37, 3).t()  # (3, 37), not contiguous
    w = torch.randn(37, 20).t()  # (20, 37)
    b = torch.randn(40)[::2]  # stride 2
    torch.testing.assert_close(skinny(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="1..64 rows"):
        skinny(torch.randn(65, 8), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="float32"):
        skinny(torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="shape"):
        skinny(torch.randn(2, 8), torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="bias"):
        skinny(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5))


@pytest.fixture
def linear_calls(monkeypatch) -> list[tuple]:
    """Record every F.linear call (the fallback path of SkinnyLinear)."""
    calls: list[tuple] = []
    real = F.linear

    def spy(x, w, b=None):
        calls.append(tuple(x.shape))
        return real(x, w, b)

    monkeypatch.setattr(F, "linear", spy)
    return calls


@needs_native
def test_skinny_linear_module_dispatch(linear_calls):
    layer = nn.Linear(24, 10)
    layer.__class__ = SkinnyLinear
    ref = nn.Linear(24, 10)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 24)  # 6 rows

    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), atol=1e-4, rtol=1e-4)
        linear_calls.clear()
        layer(x)
        assert linear_calls == []  # the kernel ran
        layer(torch.randn(65, 24))  # too many rows
        assert linear_calls == [(65, 24)]
        xt = x.transpose(0, 1)  # not contiguous, still 6 fp32 rows: kernel
        torch.testing.assert_close(layer(xt), ref(xt), atol=1e-4, rtol=1e-4)
        assert len(linear_calls) == 2  # only ref's call was added
    layer_bf16 = copy.deepcopy(layer).to(torch.bfloat16)
    with torch.no_grad():
        layer_bf16(x.to(torch.bfloat16))
    assert linear_calls[-1] == (2, 3, 24)

    linear_calls.clear()
    out = layer(x)  # grad enabled: autograd needs torch's op
    assert linear_calls == [(2, 3, 24)]
    out.sum().backward()
    assert layer.weight.grad is not None
    with torch.inference_mode():
        linear_calls.clear()
        layer(x[0, 0])  # a single vector (one row)
        assert linear_calls == []


def test_fallbacks_without_the_kernel(monkeypatch):
    monkeypatch.setenv("PAGODA_NO_KERNELS", "1")
    assert native_available.__wrapped__() is False
    monkeypatch.setattr(kernels, "native_available", lambda: False)
    model = Transformer(ModelConfig.from_name("tiny-llama"))
    use_native_kernels(model)
    assert not any(isinstance(m, SkinnyLinear) for m in model.modules())


@needs_native
def test_use_native_kernels_keeps_weights_tied_and_outputs_unchanged():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-llama", init_std=0.3)).eval()
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert use_native_kernels(model) is model
    assert model.lm_head.weight is model.embed.weight
    assert isinstance(model.lm_head, SkinnyLinear)
    assert all(type(m) is not nn.Linear for m in model.modules())
    assert list(model.state_dict()) == keys
    use_native_kernels(model)  # idempotent
    assert model.lm_head.weight is model.embed.weight

    ids = torch.randint(0, 512, (2, 20))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), reference(ids), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(ids[:1, :5]), reference(ids[:1, :5]), atol=1e-4,
                                   rtol=1e-4)  # 5 rows: kernel in every layer
        caches = [KVCache(m.cfg, 2, 24) for m in (model, reference)]
        for m, cache in zip((model, reference), caches, strict=True):
            m(ids[:, :19], cache=cache)
        step = ids[:, 19:]
        torch.testing.assert_close(model(step, cache=caches[0]), reference(step, cache=caches[1]),
                                   atol=1e-4, rtol=1e-4)
    # training a converted model still works (autograd path) and the tie holds
    model.train()
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    assert model.embed.weight.grad is not None
    assert model.lm_head.weight.grad is model.embed.weight.grad


@needs_native
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_rms_norm_kernel_matches_module(rows):
    from pagoda.model.norm import RMSNorm

    norm = RMSNorm(96, eps=1e-5)
    nn.init.normal_(norm.weight)
    x = torch.randn(rows, 2, 96) * 3
    expected = norm(x)
    torch.testing.assert_close(torch.ops.pagoda_kernels.rms_norm(x, norm.weight, 1e-5), expected,
                               atol=1e-5, rtol=1e-5)


@needs_native
def test_rope_kernel_matches_apply_rope_on_strided_views():
    from pagoda.model.position import apply_rope

    B, T, H, hd = 2, 5, 3, 16
    q = torch.randn(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd) view, like the projections
    angles = torch.randn(B, 1, T, hd // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    expected = apply_rope(q, cos, sin)
    torch.ops.pagoda_kernels.rope_(q, cos, sin)
    torch.testing.assert_close(q, expected, atol=1e-6, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("with_mask", [False, True])
def test_decode_attention_kernel_matches_sdpa(with_mask):
    B, H, Hkv, S, hd = 3, 6, 2, 37, 16
    q = torch.randn(B, 1, H, hd).transpose(1, 2)
    cache_k, cache_v = torch.randn(B, Hkv, 64, hd), torch.randn(B, Hkv, 64, hd)
    k, v = cache_k.narrow(2, 0, S), cache_v.narrow(2, 0, S)  # strided views, as from KVCache
    mask = (torch.rand(B, 1, 1, S) > 0.3) if with_mask else None
    if mask is not None:
        mask[..., -1] = True  # the new token always sees itself
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = torch.ops.pagoda_kernels.decode_attention(q, k, v, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@needs_native
def test_native_modules_leave_training_untouched():
    model = use_native_kernels(Transformer(ModelConfig.from_name("tiny-llama")))
    ids = torch.randint(0, 512, (2, 12))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()  # grad enabled: every swapped module must take its PyTorch path
    assert model.layers[0].attn.q_proj.weight.grad is not None


def _paged_forward(model, pool, prompts, blocks_per_row):
    """Prefill each prompt alone, then one decode token for all rows together."""
    from pagoda.infer.paged_cache import PagedBatch

    order = torch.randperm(len(prompts) * blocks_per_row, generator=torch.Generator().manual_seed(0))
    tables = order.view(len(prompts), blocks_per_row).tolist()  # scattered blocks
    for table, prompt in zip(tables, prompts, strict=True):
        model(torch.tensor([prompt[:-1]]), cache=PagedBatch(pool, [table], [0], len(prompt) - 1))
    step = PagedBatch(pool, tables, [len(p) - 1 for p in prompts], 1)
    return model(torch.tensor([[p[-1]] for p in prompts]), cache=step), step


@needs_native
@pytest.mark.parametrize("qkv_bias", [False, True])  # Llama / Qwen2
def test_decode_block_matches_the_pytorch_block(qkv_bias, monkeypatch):
    from pagoda.infer.kernels import NativeBlock
    from pagoda.infer.paged_cache import PagedKVPool

    torch.manual_seed(1)
    cfg = ModelConfig.from_name("tiny-llama", init_std=0.3, attn_qkv_bias=qkv_bias)
    reference = Transformer(cfg).eval()
    model = use_native_kernels(copy.deepcopy(reference))
    assert all(type(b) is NativeBlock and b._fusable for b in model.layers)
    calls = []
    real = torch.ops.pagoda_kernels.decode_block
    monkeypatch.setattr(kernels.torch.ops.pagoda_kernels, "decode_block",
                        lambda *a: calls.append(a[0].shape) or real(*a), raising=False)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (5, 17, 40)]
    pools = [PagedKVPool(cfg, 12, 16) for _ in range(2)]  # 3 rows of 4 blocks
    with torch.inference_mode():
        got, step = _paged_forward(model, pools[0], prompts, 4)
        want, _ = _paged_forward(reference, pools[1], prompts, 4)
    assert calls == [(3, cfg.d_model)] * cfg.n_layer  # only the decode step took the kernel
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    slots = step.new_slots
    torch.testing.assert_close(pools[0].k[:, slots], pools[1].k[:, slots], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pools[0].v[:, slots], pools[1].v[:, slots], atol=1e-5, rtol=1e-5)


@needs_native
def test_decode_block_structure_checks():
    gelu = ModelConfig.from_name("tiny-llama", activation="gelu")
    post = ModelConfig.from_name("tiny-llama", norm_position="post")
    for cfg in (gelu, post):
        model = use_native_kernels(Transformer(cfg).eval())
        assert not any(b._fusable for b in model.layers)
    with pytest.raises(RuntimeError, match="lengths"):
        torch.ops.pagoda_kernels.paged_decode_attention(
            torch.randn(1, 2, 1, 8), torch.randn(16, 1, 8), torch.randn(16, 1, 8),
            torch.tensor([[0, 1]]), torch.tensor([9]), 4)  # 9 positions > 2 blocks of 4
    with pytest.raises(RuntimeError, match="block id"):
        torch.ops.pagoda_kernels.paged_decode_attention(
            torch.randn(1, 2, 1, 8), torch.randn(16, 1, 8), torch.randn(16, 1, 8),
            torch.tensor([[0, 7]]), torch.tensor([6]), 4)  # block 7 is past the 16-slot pool


def _prefill_reference(q, k_pool, v_pool, tables, starts, block_size):
    """SDPA over keys gathered from the pool, with an explicit causal mask after each prefix."""
    B, _, T, _ = q.shape
    total = int(starts.max()) + T
    slots = (tables[:, :, None] * block_size + torch.arange(block_size)).flatten(1)[:, :total]
    keys, values = k_pool[slots].transpose(1, 2), v_pool[slots].transpose(1, 2)  # (B, Hkv, S, hd)
    query_pos = starts[:, None, None] + torch.arange(T)[None, :, None]  # (B, T, 1)
    visible = torch.arange(total)[None, None, :] <= query_pos  # (B, T, S)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None],
                                          enable_gqa=True)


@needs_native
@pytest.mark.parametrize("B,H,Hkv,T,starts,hd", [
    (1, 9, 3, 200, [0], 64),  # SmolLM2's heads, a fresh prompt over several key blocks
    (1, 4, 4, 37, [0], 32),  # MHA, T not a multiple of the query block
    (2, 8, 2, 19, [5, 70], 128),  # chunks after cached prefixes of different lengths
    (3, 6, 1, 2, [0, 1, 63], 40),  # MQA, head size 40 (a 32 + 8 split of the value tile)
    (1, 2, 2, 65, [64], 8),  # a key block boundary exactly at the prefix
])
def test_paged_prefill_attention_matches_sdpa(B, H, Hkv, T, starts, hd):
    g = torch.Generator().manual_seed(T)
    block_size = 16
    starts = torch.tensor(starts)
    blocks = -(-(int(starts.max()) + T) // block_size)
    pool_blocks = B * blocks + 3
    k_pool = torch.randn(pool_blocks * block_size, Hkv, hd, generator=g)
    v_pool = torch.randn(pool_blocks * block_size, Hkv, hd, generator=g)
    tables = torch.randperm(pool_blocks, generator=g)[:B * blocks].view(B, blocks)  # scattered
    q = torch.randn(B, T, H, hd, generator=g).transpose(1, 2)  # the projection's strided view
    got = torch.ops.pagoda_kernels.paged_prefill_attention(q, k_pool, v_pool, tables, starts,
                                                           block_size)
    want = _prefill_reference(q, k_pool, v_pool, tables, starts, block_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@needs_native
def test_paged_prefill_attention_rejects_bad_shapes():
    pool = torch.randn(16, 1, 12)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        torch.ops.pagoda_kernels.paged_prefill_attention(
            torch.randn(1, 2, 3, 12), pool, pool, torch.tensor([[0]]), torch.tensor([0]), 16)
    pool = torch.randn(16, 1, 8)
    with pytest.raises(RuntimeError, match="lengths"):  # 5 cached + 3 new > one block of 4
        torch.ops.pagoda_kernels.paged_prefill_attention(
            torch.randn(1, 2, 3, 8), pool, pool, torch.tensor([[0]]), torch.tensor([5]), 4)


@needs_native
def test_silu_mul_matches_torch():
    gate_up = torch.randn(3, 5, 2 * 37) * 8  # saturating gates at both ends
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(torch.ops.pagoda_kernels.silu_mul(gate_up), F.silu(gate) * up,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="2F"):
        torch.ops.pagoda_kernels.silu_mul(torch.randn(2, 7))
