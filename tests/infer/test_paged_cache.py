"""Paged KV cache: every way of feeding tokens through it gives the full forward pass's logits."""

from __future__ import annotations

import pytest
import torch

from pagoda.infer.kernels import use_native_kernels
from pagoda.infer.paged_cache import BlockAllocator, PackedBatch, PagedBatch, PagedKVPool
from pagoda.model.config import ModelConfig
from pagoda.model.transformer import Transformer

TINY = dict(vocab_size=97, max_seq_len=64, d_model=32, n_layer=2, n_head=4, d_ff=48)
CONFIGS = {
    "llama-gqa": ModelConfig.from_name("tiny-llama", **TINY, n_kv_head=2),
    "qwen2-bias": ModelConfig.from_name("qwen2-0.5b", **TINY, n_kv_head=2),
    "mistral-window": ModelConfig.from_name("mistral-7b", **TINY, n_kv_head=2, sliding_window=4),
    "gpt2-learned": ModelConfig.from_name("gpt2", **TINY),
}


def build(cfg: ModelConfig, native: bool) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return use_native_kernels(model) if native else model


def tables_for(pool: PagedKVPool, n_seqs: int, tokens: int) -> list[list[int]]:
    """Scattered block tables (a shuffled pool) with room for `tokens` per sequence."""
    per = pool.blocks_needed(tokens)
    order = torch.randperm(pool.allocator.num_blocks, generator=torch.Generator().manual_seed(1))
    return order[:n_seqs * per].view(n_seqs, per).tolist()


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixed_packed_steps_match_the_full_forward(name, native):
    """Sequences at different stages (fresh prompt, chunk after a cached prefix, decode tokens)
    packed into one row give the logits of running each sequence whole."""
    cfg = CONFIGS[name]
    model = build(cfg, native)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (9, 14, 6, 11)]
    pool = PagedKVPool(cfg, 16, 4)
    tables = tables_for(pool, len(seqs), 16)
    cached = [8, 5, 0, 10]  # seq 0 and 3 decode one token, seq 1 a chunk after 5, seq 2 fresh
    with torch.inference_mode():
        for table, seq, n in zip(tables, seqs, cached, strict=True):  # fill the prefixes
            if n:
                model(torch.tensor([seq[:n]]), cache=PagedBatch(pool, [table], [0], n))
        counts = [len(s) - n for s, n in zip(seqs, cached, strict=True)]  # 1, 9, 6, 1
        batch = PackedBatch(pool, tables, cached, counts)
        ids = [t for i in batch.order for t in seqs[i][cached[i]:]]
        got = model(torch.tensor([ids]), cache=batch, keep=batch.last_tokens)[0]
        for row, i in enumerate(batch.order):
            want = model(torch.tensor([seqs[i]]))[0, -1]
            torch.testing.assert_close(got[row], want, atol=1e-4, rtol=1e-4)
    assert batch.order == [0, 3, 1, 2]  # decode tokens first, then chunks in order
    assert batch.last_tokens.tolist() == [0, 1, 10, 16]


def test_prompt_chunks_take_the_prefill_kernel(monkeypatch):
    """A chunk (fresh or after a cached prefix) attends with the paged flash kernel, straight
    from the pool; a sliding window, which the kernel does not mask, keeps the SDPA path."""
    from pagoda.infer.kernels import native_available

    if not native_available():
        pytest.skip("native kernels did not build")
    calls = []
    real = torch.ops.pagoda_kernels.paged_prefill_attention
    monkeypatch.setattr(torch.ops.pagoda_kernels, "paged_prefill_attention",
                        lambda *a: calls.append(a[4].tolist()) or real(*a), raising=False)
    pool = PagedKVPool(CONFIGS["llama-gqa"], 8, 4)
    assert PagedBatch(pool, [[0, 1]], [0], 6).prefill_kernel
    assert not PagedBatch(pool, [[0, 1]], [5], 1).prefill_kernel  # decode: the decode kernels
    window = PagedKVPool(CONFIGS["mistral-window"], 8, 4)
    assert not PagedBatch(window, [[0, 1]], [0], 6).prefill_kernel
    model = build(CONFIGS["llama-gqa"], native=True)
    table = tables_for(pool, 1, 16)[0]
    with torch.inference_mode():
        model(torch.tensor([list(range(7))]), cache=PagedBatch(pool, [table], [0], 7))
        model(torch.tensor([list(range(5))]), cache=PagedBatch(pool, [table], [7], 5))
    assert calls == [[0]] * 2 + [[7]] * 2  # two layers each, the cached prefix passed along


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window"])
def test_decode_batches_of_different_lengths(name):
    cfg = CONFIGS[name]
    model = build(cfg, native=True)
    seqs = [torch.randint(0, 97, (n,)).tolist() for n in (3, 12, 7)]
    pool = PagedKVPool(cfg, 16, 4)
    tables = tables_for(pool, 3, 16)
    with torch.inference_mode():
        for table, seq in zip(tables, seqs, strict=True):
            model(torch.tensor([seq[:-1]]), cache=PagedBatch(pool, [table], [0], len(seq) - 1))
        lengths = [len(s) - 1 for s in seqs]
        got = model(torch.tensor([[s[-1]] for s in seqs]),
                    cache=PagedBatch(pool, tables, lengths, 1))[:, -1]
        for row, seq in enumerate(seqs):
            torch.testing.assert_close(got[row], model(torch.tensor([seq]))[0, -1], atol=1e-4,
                                       rtol=1e-4)


def test_block_allocator_prefix_cache():
    alloc = BlockAllocator(3)
    a, b = alloc.allocate(), alloc.allocate()
    alloc.register(a, b"A")
    alloc.register(b, b"A")  # a key names one block: the second registration is ignored
    assert alloc.num_cached == 1
    assert alloc.acquire(b"A") == a and alloc.acquire(b"missing") is None
    alloc.release([a, b])
    assert alloc.num_used == 1  # a is still held by its second user
    alloc.release([a])
    assert alloc.num_used == 0 and alloc.num_free == 3 and alloc.num_cached == 1
    assert alloc.acquire(b"A") == a  # kept after its last user left
    alloc.release([a])
    taken = {alloc.allocate() for _ in range(3)}  # free blocks first, then the cached one
    assert taken == {0, 1, 2} and alloc.num_cached == 0 and alloc.acquire(b"A") is None
    alloc.release(list(taken))
    c = alloc.allocate()
    alloc.register(c, b"C")
    alloc.release([c])
    alloc.clear_cache()
    assert alloc.num_cached == 0 and alloc.num_free == 3 and alloc.acquire(b"C") is None


def test_block_allocator_and_pool_accounting():
    alloc = BlockAllocator(3)
    blocks = [alloc.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and alloc.allocate() is None and alloc.num_used == 3
    alloc.release(blocks[:2])
    assert alloc.num_free == 2
    pool = PagedKVPool(CONFIGS["llama-gqa"], 4, 4)
    table: list[int] = []
    assert pool.grow(table, 9) and len(table) == 3
    assert not pool.grow(table, 17) and len(table) == 3  # unchanged when the pool is short
    assert pool.slots(table, 3, 6) == [table[0] * 4 + 3, table[1] * 4, table[1] * 4 + 1]
