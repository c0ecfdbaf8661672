"""Attention: causal masking, MHA/GQA/MQA equivalence, bidirectional mode, the T == 1 fast path."""

import math

import pytest
import torch

from pagoda.model.attention import Attention
from pagoda.model.config import ModelConfig
from pagoda.model.kv_cache import KVCache
from pagoda.model.position import rope_table

D, H, HD = 32, 4, 8


def make(n_kv: int = H, seed: int = 0, **kw) -> tuple[Attention, ModelConfig]:
    cfg = ModelConfig(d_model=D, n_head=H, n_kv_head=n_kv, d_ff=64, n_layer=1, vocab_size=50,
                      max_seq_len=64, attn_qkv_bias=True, attn_out_bias=True, **kw)
    torch.manual_seed(seed)
    attn = Attention(cfg, layer=0).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(std=0.3)
    return attn, cfg


def reference(attn: Attention, x: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """softmax(Q K^T / sqrt(hd) + mask) V written out, with K/V heads repeated for GQA."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, H, HD).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, attn.n_kv, HD).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, attn.n_kv, HD).transpose(1, 2)
    k = k.repeat_interleave(H // attn.n_kv, dim=1)  # query head h uses kv head h // group
    v = v.repeat_interleave(H // attn.n_kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(HD)  # (B, H, T, T)
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * HD))


def expand_to_mha(gqa: Attention) -> Attention:
    """An MHA layer computing the same function: each K/V head copied to its query group."""
    mha, _ = make(n_kv=H, seed=99, causal=gqa.causal)
    group = H // gqa.n_kv
    with torch.no_grad():
        for name in ("q_proj", "o_proj"):
            getattr(mha, name).load_state_dict(getattr(gqa, name).state_dict())
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(gqa, name), getattr(mha, name)
            dst.weight.copy_(src.weight.view(gqa.n_kv, HD, D).repeat_interleave(group, 0)
                             .reshape(H * HD, D))
            dst.bias.copy_(src.bias.view(gqa.n_kv, HD).repeat_interleave(group, 0).reshape(-1))
    return mha


@pytest.mark.parametrize("n_kv", [4, 2, 1])  # MHA, GQA, MQA
def test_matches_the_written_out_formula(n_kv):
    attn, _ = make(n_kv)
    x = torch.randn(2, 9, D)
    torch.testing.assert_close(attn(x, None, None, None), reference(attn, x), rtol=1e-4,
                               atol=1e-5)


def test_future_tokens_do_not_change_earlier_outputs():
    attn, _ = make(2)
    x = torch.randn(1, 10, D)
    changed = x.clone()
    changed[:, 6:] = torch.randn(1, 4, D)
    y, y2 = attn(x, None, None, None), attn(changed, None, None, None)
    torch.testing.assert_close(y[:, :6], y2[:, :6])
    assert (y[:, 6:] - y2[:, 6:]).abs().max() > 1e-2


def test_bidirectional_attention_sees_the_future():
    attn, _ = make(2, causal=False)
    x = torch.randn(1, 10, D)
    changed = x.clone()
    changed[:, 9] = torch.randn(D)
    y, y2 = attn(x, None, None, None), attn(changed, None, None, None)
    assert (y[:, 0] - y2[:, 0]).abs().max() > 1e-3
    torch.testing.assert_close(y, reference(attn, x, causal=False), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_kv", [2, 1])
def test_gqa_equals_mha_with_repeated_kv_weights(n_kv):
    gqa, _ = make(n_kv)
    mha = expand_to_mha(gqa)
    x = torch.randn(2, 7, D)
    torch.testing.assert_close(gqa(x, None, None, None), mha(x, None, None, None), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("n_kv", [2, 1])
@pytest.mark.parametrize("pad", [None, [0, 3]])
def test_single_token_fast_path_equals_the_general_path(n_kv, pad):
    """Decode (T == 1) folds the query group into the length axis; MHA takes the plain path."""
    gqa, cfg = make(n_kv)
    mha = expand_to_mha(gqa)
    x = torch.randn(2, 8, D)
    cos, sin = rope_table(cfg)
    outs = []
    for attn in (gqa, mha):
        cache = KVCache(cfg.replace(n_kv_head=attn.n_kv), 2, 16, pad=pad)
        pos = cache.positions(7)
        rope = (cos[pos].unsqueeze(1), sin[pos].unsqueeze(1))
        attn(x[:, :7], rope, cache, cache.attention_mask(7))
        cache.advance(7)
        pos = cache.positions(1)
        rope = (cos[pos].unsqueeze(1), sin[pos].unsqueeze(1))
        outs.append(attn(x[:, 7:], rope, cache, cache.attention_mask(1)))
    assert outs[0].shape == (2, 1, D)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_rope_attention_is_invariant_to_a_shift_of_all_positions():
    attn, cfg = make(2)
    cos, sin = rope_table(cfg)
    x = torch.randn(1, 6, D)

    def run(start: int) -> torch.Tensor:
        pos = torch.arange(start, start + 6)
        return attn(x, (cos[pos][None, None], sin[pos][None, None]), None, None)

    torch.testing.assert_close(run(0), run(40), rtol=1e-4, atol=1e-5)


def test_attention_dropout_only_while_training():
    attn, _ = make(2, dropout=0.5)
    x = torch.randn(1, 12, D)
    torch.testing.assert_close(attn(x, None, None, None), attn(x, None, None, None))
    attn.train()
    torch.manual_seed(1)
    a = attn(x, None, None, None)
    torch.manual_seed(2)
    assert (a - attn(x, None, None, None)).abs().max() > 1e-3
