"""Paged KV cache (as in vLLM): fixed-size blocks from one pool, a block table per sequence.

Memory is taken block by block as sequences grow, never reserved for the longest possible
request, and a finished or cancelled sequence returns its blocks at once. Keys and values live in
(layers, slots, n_kv, hd) pools where slot = block * block_size + offset; `PagedBatch` is the view
one forward pass uses (it implements the model's `AttentionCache` protocol).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import cached_property

import torch

from pagoda.infer.kernels import native_available
from pagoda.model.config import ModelConfig
from pagoda.model.kv_cache import AttendFn


class BlockAllocator:
    """A free list of block ids, reference counts, and a prefix cache of full blocks.

    Blocks can be shared: a full block whose tokens are known is registered under a key naming
    its contents (every token up to its end, and the adapter), and a later sequence with the same
    prefix acquires it instead of recomputing it (vLLM's automatic prefix caching). When its last
    user releases it, a registered block keeps its contents and is reused only once the free
    list is empty, least recently released first.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}  # registered block -> key
        self._block_of: dict[bytes, int] = {}  # key -> registered block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unused; LRU first

    @property
    def num_free(self) -> int:
        """Blocks a sequence can get now (free, or cached and unused)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (in use or not)."""
        return len(self._block_of)

    def allocate(self) -> int | None:
        """One block for new contents, or None when the pool is exhausted."""
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        else:
            return None
        self._refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Give blocks back (a sequence finished, was cancelled or preempted)."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def register(self, block: int, key: bytes) -> None:
        """Record that `block` (full, in use) holds the contents named by key."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def clear_cache(self) -> None:
        """Forget every registered block (their contents are stale, e.g. an adapter was
        replaced); blocks in use stay with their sequences and are freed as usual."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._key_of.clear()
        self._block_of.clear()

    def acquire(self, key: bytes) -> int | None:
        """The cached block holding key's contents, now also held by the caller, or None."""
        block = self._block_of.get(key)
        if block is not None:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        return block


class PagedKVPool:
    """The key/value storage of every running sequence, plus its block allocator."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (cfg.n_layer, num_blocks * block_size, cfg.kv_heads, cfg.dim_head)
        # torch.empty maps pages lazily: untouched blocks cost address space, not memory
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.sliding_window = cfg.sliding_window

    def blocks_needed(self, n_tokens: int) -> int:
        """Blocks that hold n_tokens tokens."""
        return -(-n_tokens // self.block_size)

    def grow(self, table: list[int], n_tokens: int) -> bool:
        """Extend a block table to hold n_tokens; False (table unchanged) if the pool is full."""
        missing = self.blocks_needed(n_tokens) - len(table)
        if missing > self.allocator.num_free:
            return False
        table.extend(self.allocator.allocate() for _ in range(max(0, missing)))
        return True

    def slots(self, table: list[int], start: int, end: int) -> list[int]:
        """Pool slots of token positions start..end-1 of a sequence."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]


class PagedBatch:
    """One forward pass over B sequences that each add n_new tokens after `lengths` cached ones."""

    def __init__(self, pool: PagedKVPool, tables: list[list[int]], lengths: list[int],
                 n_new: int) -> None:
        self.pool = pool
        device = pool.k.device
        self.lengths = torch.tensor(lengths, device=device)  # (B,) cached before this pass
        self.total = self.lengths + n_new  # (B,) keys each row attends to
        self.width = max(lengths) + n_new  # longest row after this pass
        self.new_slots = torch.tensor(
            [s for t, n in zip(tables, lengths, strict=True) for s in pool.slots(t, n, n + n_new)],
            device=device)  # (B * n_new,)
        blocks = pool.blocks_needed(self.width)
        self.tables = torch.tensor([t[:blocks] + [0] * (blocks - len(t[:blocks])) for t in tables],
                                   device=device)  # (B, blocks), 0-padded past each row's end
        self.fresh = max(lengths) == 0  # nothing cached: attend over the new keys alone
        native = (pool.sliding_window is None and device.type == "cpu"
                  and pool.k.dtype == torch.float32 and native_available())
        self.use_kernel = native and n_new == 1  # decode: paged_decode_attention, decode_block
        # a prompt chunk: causal flash attention straight from the pool, cached prefix included
        self.prefill_kernel = native and n_new > 1 and pool.k.shape[-1] % 8 == 0

    def positions(self, n_new: int) -> torch.Tensor:
        return self.lengths.unsqueeze(1) + torch.arange(n_new, device=self.lengths.device)

    def attention_mask(self, n_new: int) -> torch.Tensor | None:
        window = self.pool.sliding_window
        if (self.use_kernel or self.prefill_kernel
                or (self.fresh and (window is None or n_new <= window))):
            return None  # the paged kernels read exactly the visible keys; SDPA does plain causal
        query = self.positions(n_new)  # (B, n_new) absolute positions
        key = torch.arange(self.width, device=query.device)  # (S,)
        visible = key[None, None, :] <= query[:, :, None]  # (B, n_new, S) causal, hides padding
        if window is not None:
            visible &= key[None, None, :] > query[:, :, None] - window
        return visible.unsqueeze(1)  # (B, 1, n_new, S)

    @cached_property
    def all_slots(self) -> torch.Tensor:
        """(B, width) pool slot of every position of every row (0 past a row's end); the same
        for every layer, so computed once per pass."""
        bs = self.pool.block_size
        offsets = torch.arange(bs, device=self.tables.device)
        slots = (self.tables[:, :, None] * bs + offsets).flatten(1)[:, :self.width]
        keep = torch.arange(self.width, device=slots.device) < self.total[:, None]
        return slots * keep

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._store(layer, k, v)
        slots = self.all_slots
        keys = self.pool.k[layer][slots]  # (B, S, n_kv, hd) gathered copy
        values = self.pool.v[layer][slots]
        return keys.transpose(1, 2), values.transpose(1, 2)  # (B, n_kv, S, hd)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, attend_fn: AttendFn) -> torch.Tensor:
        if self.prefill_kernel:
            self._store(layer, k, v)
            return torch.ops.pagoda_kernels.paged_prefill_attention(
                q, self.pool.k[layer], self.pool.v[layer], self.tables, self.lengths,
                self.pool.block_size)
        if self.fresh:
            self._store(layer, k, v)
            return attend_fn(q, k, v, mask)
        if not self.use_kernel:
            keys, values = self.update(layer, k, v)
            return attend_fn(q, keys, values, mask)
        self._store(layer, k, v)
        return torch.ops.pagoda_kernels.paged_decode_attention(
            q, self.pool.k[layer], self.pool.v[layer], self.tables, self.total,
            self.pool.block_size)

    def decode_view(self, layer: int) -> tuple[torch.Tensor, ...] | None:
        """What the fused decode-block kernel needs for this layer, or None if it does not apply:
        (k_pool, v_pool, new_slots, block_tables, lengths, block_size)."""
        if not self.use_kernel:
            return None
        return (self.pool.k[layer], self.pool.v[layer], self.new_slots, self.tables, self.total,
                self.pool.block_size)

    def advance(self, n_new: int) -> None:
        """Nothing to do: the engine advances each sequence's length itself."""

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        B, n_kv, T, hd = k.shape
        self.pool.k[layer].index_copy_(0, self.new_slots, k.transpose(1, 2).reshape(B * T, n_kv, hd))
        self.pool.v[layer].index_copy_(0, self.new_slots, v.transpose(1, 2).reshape(B * T, n_kv, hd))


class PackedBatch:
    """One forward pass over sequences adding different numbers of tokens, packed into a single
    row (1, T): decode tokens first, then each prompt chunk. Every weight is read once for all of
    them, so decode tokens ride along a prefill chunk almost free (vLLM's mixed batches).
    Attention runs per part: one `PagedBatch` for all decode tokens, one per prompt chunk."""

    def __init__(self, pool: PagedKVPool, tables: list[list[int]], lengths: list[int],
                 counts: list[int]) -> None:
        decode = [i for i, n in enumerate(counts) if n == 1]
        chunks = [i for i, n in enumerate(counts) if n > 1]
        self.order = decode + chunks  # sequence indices in packed order
        # (batch, first token, end token, decode part?)
        self.parts: list[tuple[PagedBatch, int, int, bool]] = []
        if decode:
            self.parts.append((PagedBatch(pool, [tables[i] for i in decode],
                                          [lengths[i] for i in decode], 1), 0, len(decode), True))
        start = len(decode)
        for i in chunks:
            batch = PagedBatch(pool, [tables[i]], [lengths[i]], counts[i])
            self.parts.append((batch, start, start + counts[i], False))
            start += counts[i]
        last = [*range(len(decode)), *(end - 1 for _, _, end, dec in self.parts if not dec)]
        self.last_tokens = torch.tensor(last, device=pool.k.device)  # per sequence, packed order

    def positions(self, n_new: int) -> torch.Tensor:
        parts = [batch.positions(1 if dec else end - start).reshape(-1)
                 for batch, start, end, dec in self.parts]
        return torch.cat(parts).unsqueeze(0)  # (1, T)

    def attention_mask(self, n_new: int) -> torch.Tensor | None:
        return None  # each part builds its own in `attend`

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("a packed batch attends part by part: use attend()")

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, attend_fn: AttendFn) -> torch.Tensor:
        outs = []
        for batch, start, end, dec in self.parts:
            part = [t[:, :, start:end] for t in (q, k, v)]  # (1, heads, n, hd)
            if dec:  # n sequences of one token each: (n, heads, 1, hd)
                part = [t.transpose(0, 2) for t in part]
            y = batch.attend(layer, *part, batch.attention_mask(part[0].shape[2]), attend_fn)
            outs.append(y.transpose(0, 2) if dec else y)
        return torch.cat(outs, dim=2)  # (1, H, T, hd)

    def advance(self, n_new: int) -> None:
        """Nothing to do: the engine advances each sequence's length itself."""
