"""KV cache: incremental decoding equals the full forward pass, for every positional scheme."""

import pytest
import torch

from pagoda.model.config import ModelConfig
from pagoda.model.kv_cache import KVCache
from pagoda.model.transformer import Transformer

TINY = dict(vocab_size=97, max_seq_len=64, d_model=32, n_layer=2, n_head=4, d_ff=48)
CONFIGS = {
    "llama-gqa": ModelConfig.from_name("tiny-llama", **TINY, n_kv_head=2),
    "llama-mqa": ModelConfig.from_name("tiny-llama", **TINY, n_kv_head=1),
    "qwen2-bias": ModelConfig.from_name("qwen2-0.5b", **TINY, n_kv_head=2),
    "mistral-window": ModelConfig.from_name("mistral-7b", **TINY, n_kv_head=2, sliding_window=4),
    "gpt2-learned": ModelConfig.from_name("gpt2", **TINY),
    "sinusoidal-post-norm": ModelConfig.from_name("transformer-base", **TINY, dropout=0.0),
    "moe": ModelConfig.from_name("tiny-moe", **TINY, n_kv_head=2),
}


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger than the init, so that every component visibly matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@torch.no_grad()
def run_in_chunks(model: Transformer, ids: torch.Tensor, chunks: list[int],
                  pad: list[int] | None = None) -> torch.Tensor:
    """Logits (B, T, V) computed chunk by chunk through one KVCache."""
    cache = KVCache(model.cfg, ids.shape[0], ids.shape[1], pad=pad)
    out, start = [], 0
    for n in chunks:
        out.append(model(ids[:, start:start + n], cache=cache))
        start += n
    assert start == ids.shape[1] and cache.length == start
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_token_by_token_decode_equals_full_forward(name):
    model = build(CONFIGS[name])
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
    torch.testing.assert_close(run_in_chunks(model, ids, [5] + [1] * 7), full, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window", "gpt2-learned", "moe"])
def test_chunked_prefill_equals_full_forward(name):
    model = build(CONFIGS[name])
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
    torch.testing.assert_close(run_in_chunks(model, ids, [4, 3, 5]), full, rtol=1e-4, atol=1e-4)


def test_sliding_window_actually_limits_what_a_token_sees():
    model = build(CONFIGS["mistral-window"])  # window 4 (each token sees itself + 3 before)
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 97
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # With two layers, token 0 reaches positions up to 2 * (4 - 1) = 6 and no further.
    assert (a[0, 6] - b[0, 6]).abs().max() > 1e-4
    torch.testing.assert_close(a[0, 7:], b[0, 7:])
    no_window = build(CONFIGS["mistral-window"].replace(sliding_window=None))
    with torch.no_grad():
        assert (no_window(ids)[0, 9] - no_window(changed)[0, 9]).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window", "gpt2-learned",
                                  "sinusoidal-post-norm", "moe"])
def test_left_padded_batch_matches_unpadded_single_runs(name):
    model = build(CONFIGS[name])
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 97, (n,), generator=gen) for n in (5, 9, 3)]
    new = torch.randint(0, 97, (3, 4), generator=gen)  # four decode steps per row
    longest = max(len(p) for p in prompts)
    pad = [longest - len(p) for p in prompts]
    batch = torch.stack([torch.cat([torch.full((n,), 7), p]) for n, p in
                         zip(pad, prompts, strict=True)])
    cache = KVCache(model.cfg, 3, longest + 4, pad=pad)
    with torch.no_grad():
        batched = [model(batch, cache=cache)]
        batched += [model(new[:, i:i + 1], cache=cache) for i in range(4)]
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, new[row]])[None])[0]  # (len + 4, V)
            got = torch.cat([batched[0][row, pad[row]:]] + [b[row] for b in batched[1:]])
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-4)


def test_positions_skip_the_left_padding():
    cfg = CONFIGS["llama-gqa"]
    cache = KVCache(cfg, 2, 10, pad=[0, 3])
    assert cache.positions(5).tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 0, 1]]
    cache.advance(5)
    assert cache.positions(1).tolist() == [[5], [2]]


def test_mask_is_left_to_sdpa_when_plain_causal_suffices():
    cfg = CONFIGS["llama-gqa"]
    cache = KVCache(cfg, 2, 20)
    assert cache.attention_mask(6) is None  # fresh prefill
    cache.advance(6)
    assert cache.attention_mask(1) is None  # decode step
    mask = cache.attention_mask(3)  # a chunk after cached tokens needs an explicit mask
    assert mask.shape == (2, 1, 3, 9)
    assert mask[0, 0].tolist() == [[True] * 7 + [False] * 2, [True] * 8 + [False],
                                   [True] * 9]


def test_padding_and_window_masks():
    cfg = CONFIGS["mistral-window"]  # window 4
    cache = KVCache(cfg, 2, 20, pad=[0, 2])
    mask = cache.attention_mask(6)  # (B, 1, 6, 6)
    assert mask.shape == (2, 1, 6, 6)
    expected_row0 = [[k <= q and k > q - 4 for k in range(6)] for q in range(6)]
    assert mask[0, 0].tolist() == expected_row0
    expected_row1 = [[k <= q and k > q - 4 and k >= 2 for k in range(6)] for q in range(6)]
    assert mask[1, 0].tolist() == expected_row1
    cache.advance(6)
    decode = cache.attention_mask(1)  # 7 slots > window: the mask is needed for decode too
    assert decode[0, 0, 0].tolist() == [False] * 3 + [True] * 4


def test_cache_reserves_its_memory_up_front():
    cfg = CONFIGS["llama-gqa"]  # 2 layers, 2 kv heads, head_dim 8
    cache = KVCache(cfg, batch_size=3, max_len=10, dtype=torch.bfloat16)
    assert cache.bytes == 2 * (2 * 3 * 2 * 10 * 8) * 2
    k, v = cache.update(1, torch.ones(3, 2, 4, 8), torch.ones(3, 2, 4, 8))
    assert k.shape == v.shape == (3, 2, 4, 8) and cache.length == 0
    cache.advance(4)
    assert cache.k[1, :, :, :4].eq(1).all() and cache.k[0].eq(0).all()
