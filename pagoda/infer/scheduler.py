"""Continuous-batching scheduler: which sequences run this step, and with how many tokens.

Each step has a token budget. Running sequences that are decoding take one token each; a prompt
being prefilled takes what is left of the budget (chunked prefill), so a long prompt never stalls
the others. Waiting requests join between steps while there is room (running cap, budget, KV
blocks). When the KV pool runs out mid-decode, the most recently admitted sequence is preempted:
its blocks are freed and it is recomputed later from its tokens (vLLM's recompute preemption).
With prefix caching, a sequence starts from the longest run of full blocks some earlier sequence
already computed for the same leading tokens (a shared system prompt, the earlier turns of a
chat, a preempted sequence's own blocks) and prefills only the rest.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import deque
from dataclasses import dataclass, field

from pagoda.infer.paged_cache import PagedKVPool
from pagoda.infer.sampling import SamplingParams, SequenceSamplingState


@dataclass
class Sequence:
    """One request's tokens, KV blocks and sampling state."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    budget: int  # most tokens it may generate
    stops: frozenset[int]  # token ids that end it
    state: SequenceSamplingState
    output_ids: list[int] = field(default_factory=list)
    table: list[int] = field(default_factory=list)  # KV block ids, in order
    cached: int = 0  # leading tokens whose keys/values are in the pool
    adapter: str | None = None  # LoRA adapter applied to this sequence's tokens (None: base)
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of full blocks

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def block_key(self, index: int, block_size: int) -> bytes:
        """Prefix-cache key of the index-th full block of tokens: a hash chained over every
        block up to it, rooted in the adapter (whose keys and values differ from the base's)."""
        if len(self.block_keys) <= index:
            ids = self.ids
            while len(self.block_keys) <= index:
                i = len(self.block_keys)
                parent = self.block_keys[-1] if i else f"adapter:{self.adapter}".encode()
                tokens = array("q", ids[i * block_size:(i + 1) * block_size]).tobytes()
                self.block_keys.append(hashlib.sha256(parent + tokens).digest())
        return self.block_keys[index]

    @property
    def pending(self) -> int:
        """Tokens still to be run through the model before the next one can be sampled."""
        return len(self.prompt_ids) + len(self.output_ids) - self.cached


class Scheduler:
    """Waiting queue + running set over one KV pool."""

    def __init__(self, pool: PagedKVPool, max_running: int, max_step_tokens: int,
                 prefix_caching: bool = True) -> None:
        self.pool = pool
        self.max_running = max_running
        self.max_step_tokens = max_step_tokens
        self.prefix_caching = prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.prompt_tokens = 0  # tokens of every admitted sequence so far
        self.reused_tokens = 0  # of which found in the prefix cache

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, new tokens) pairs for this step; grows block tables to fit them."""
        plan: dict[int, tuple[Sequence, int]] = {}  # id(seq) -> (seq, n), in schedule order
        budget = self.max_step_tokens
        # decoding sequences first (one token each), then prompts part-way through prefill
        for seq in sorted(self.running, key=lambda s: s.pending > 1):
            n = min(seq.pending, budget)
            if seq not in self.running or n == 0:
                continue  # preempted to make room for an earlier one, or no budget left
            if self._make_room(seq, n, plan):
                plan[id(seq)] = (seq, n)
            budget = self.max_step_tokens - sum(n for _, n in plan.values())
        while self.waiting and len(self.running) < self.max_running and budget > 0:
            seq = self.waiting[0]
            self._reuse_prefix(seq)
            n = min(seq.pending, budget)
            if not self.pool.grow(seq.table, seq.cached + n):
                self.pool.allocator.release(seq.table)  # no blocks: it waits until a
                seq.table, seq.cached = [], 0  # sequence finishes, holding none meanwhile
                break
            self.running.append(self.waiting.popleft())
            self.prompt_tokens += len(seq.ids)
            self.reused_tokens += seq.cached
            plan[id(seq)] = (seq, n)
            budget -= n
        return list(plan.values())

    def commit(self, seq: Sequence, n: int) -> None:
        """The model has run seq's next n tokens: they are cached, and the blocks they filled
        are offered to the prefix cache."""
        start, seq.cached = seq.cached, seq.cached + n
        if self.prefix_caching:
            bs = self.pool.block_size
            for i in range(start // bs, seq.cached // bs):
                self.pool.allocator.register(seq.table[i], seq.block_key(i, bs))

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start seq from the cached blocks matching its leading tokens; at least one token is
        left to run, since sampling needs its logits."""
        if not self.prefix_caching:
            return
        bs = self.pool.block_size
        for i in range((len(seq.ids) - 1) // bs):
            block = self.pool.allocator.acquire(seq.block_key(i, bs))
            if block is None:
                break
            seq.table.append(block)
        seq.cached = len(seq.table) * bs

    def _make_room(self, seq: Sequence, n: int, plan: dict[int, tuple[Sequence, int]]) -> bool:
        """Blocks for seq's next n tokens, preempting later-admitted sequences if needed."""
        while not self.pool.grow(seq.table, seq.cached + n):
            victim = self.running[-1]
            plan.pop(id(victim), None)
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and put it back at the head of the queue, to be recomputed."""
        self.release(seq)
        seq.cached = 0
        self.waiting.appendleft(seq)

    def release(self, seq: Sequence) -> None:
        """Drop seq from the running set and return its blocks to the pool."""
        if seq in self.running:
            self.running.remove(seq)
        self.pool.allocator.release(seq.table)
        seq.table = []

    def remove(self, request_id: str) -> bool:
        """Forget a request wherever it is (cancellation); True if it was there."""
        for seq in [*self.running, *self.waiting]:
            if seq.request_id == request_id:
                if seq in self.waiting:
                    self.waiting.remove(seq)
                self.release(seq)
                return True
        return False
