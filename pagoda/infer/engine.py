"""`Engine`: continuous batching over a paged KV cache — token ids in, token ids out.

Every storey that generates (CLI chat, API server, RAG, agents, RL rollouts, evaluation) calls
this engine. `Engine.step()` runs one scheduler step: the forward passes for the planned tokens
(sequences adding the same number of tokens share one pass) and one batched sampling call.
`AsyncEngine` drives `step()` from a background thread for asyncio callers such as the server.
"""

from __future__ import annotations

import asyncio
import gc
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from pagoda.errors import InvalidRequestError, ModelNotFoundError, PagodaError, QueueFullError
from pagoda.infer.generate import Timings, TokenEvent, check_request
from pagoda.infer.kernels import use_native_kernels
from pagoda.infer.paged_cache import PackedBatch, PagedBatch, PagedKVPool
from pagoda.infer.sampling import SamplingParams, SequenceSamplingState, sample
from pagoda.infer.scheduler import Scheduler, Sequence
from pagoda.model.lora import (
    LoraAdapter,
    adapter_names,
    attach_adapter,
    detach_adapter,
    route_adapters,
)
from pagoda.model.transformer import Transformer


class AdapterInUseError(PagodaError):
    """An adapter cannot be unloaded while requests use it."""

    http_status = 409
    code = "adapter_in_use"


@dataclass
class EngineConfig:
    """Capacity settings of the engine."""

    max_running: int = 16  # sequences decoded together (continuous batching)
    max_waiting: int = 256  # waiting-queue cap; beyond it add_request raises QueueFullError
    block_size: int = 16  # tokens per KV-cache block
    # KV pool size in tokens; None: room for max_running sequences of up to 2048 tokens each.
    kv_cache_tokens: int | None = None
    max_step_tokens: int = 512  # token budget per step; longer prompts prefill in chunks
    prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes computed before


@dataclass
class TokenOutput:
    """One new token of one request."""

    request_id: str
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]]
    finish_reason: str | None  # "stop" (EOS / stop token), "length", or None while running
    prompt_tokens: int


@dataclass
class EngineStats:
    """What the engine holds right now (exported as metrics)."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    block_size: int
    kv_blocks_cached: int = 0  # blocks in the prefix cache (in use or kept for reuse)
    prefix_cache_hit_rate: float = 0.0  # share of admitted tokens taken from the cache


class Engine:
    """Synchronous continuous-batching core; not thread-safe (see `AsyncEngine`)."""

    def __init__(self, model: Transformer, eos_ids: frozenset[int],
                 config: EngineConfig | None = None) -> None:
        self.model = use_native_kernels(model.eval())
        self.eos_ids = frozenset(eos_ids)
        self.config = config = config or EngineConfig()
        tokens = config.kv_cache_tokens or config.max_running * min(model.cfg.max_seq_len, 2048)
        self.pool = PagedKVPool(model.cfg, -(-tokens // config.block_size), config.block_size,
                                device=model.device, dtype=model.dtype)
        self.scheduler = Scheduler(self.pool, config.max_running, config.max_step_tokens,
                                   config.prefix_caching)

    def prepare(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                adapter: str | None = None) -> Sequence:
        """Validate a request (raising its errors) and build its sequence, without queueing it;
        `adapter` names a loaded LoRA adapter to run it with (None: the base model)."""
        if adapter is not None and adapter not in self.adapters:
            raise ModelNotFoundError(f"no LoRA adapter named '{adapter}' is loaded (loaded: "
                                     f"{', '.join(self.adapters) or 'none'})")
        budget = check_request(len(prompt_ids), params, self.model.cfg.max_seq_len)
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in 0..{vocab - 1}")
        need = self.pool.blocks_needed(len(prompt_ids) + budget)
        if need > self.pool.allocator.num_blocks:
            raise InvalidRequestError(
                f"prompt + max_tokens ({len(prompt_ids) + budget} tokens) exceeds the KV cache "
                f"({self.pool.allocator.num_blocks * self.pool.block_size} tokens); lower max_tokens")
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos
                                                    else self.eos_ids)
        return Sequence(request_id, list(prompt_ids), params, budget, stops,
                        SequenceSamplingState.for_params(params, prompt_ids), adapter=adapter)

    def admit(self, seq: Sequence) -> None:
        """Queue a prepared sequence; QueueFullError when the waiting queue is at its cap."""
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the server is busy ({len(self.scheduler.waiting)} requests "
                                 "waiting); retry shortly")
        self.scheduler.waiting.append(seq)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Validate and queue a request."""
        self.admit(self.prepare(request_id, prompt_ids, params))

    # ------------------------------------------------------------------ LoRA adapters
    @property
    def adapters(self) -> list[str]:
        """Names of the LoRA adapters loaded next to the base weights."""
        return adapter_names(self.model)

    def add_adapter(self, name: str, adapter: LoraAdapter) -> None:
        """Load a LoRA adapter that requests can pick per sequence (call between steps)."""
        if name in self.adapters:
            raise InvalidRequestError(f"an adapter named '{name}' is already loaded")
        if any(m.rsplit(".", 1)[-1] == "lm_head" for m in adapter.tensors):
            raise InvalidRequestError("adapters on lm_head cannot be served per sequence (the "
                                      "head sees only the sampled rows); merge it instead")
        attach_adapter(self.model, adapter, name)
        self.pool.allocator.clear_cache()  # the name may be back with other weights

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter no queued or running request uses (call between steps)."""
        if name not in self.adapters:
            raise ModelNotFoundError(f"no LoRA adapter named '{name}' is loaded")
        users = sum(s.adapter == name for s in [*self.scheduler.running, *self.scheduler.waiting])
        if users:
            raise AdapterInUseError(f"adapter '{name}' is in use by {users} request(s); "
                                    "retry when they finish")
        detach_adapter(self.model, name)

    def abort(self, request_id: str) -> None:
        """Cancel a request: its KV blocks are free again immediately."""
        self.scheduler.remove(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    @property
    def stats(self) -> EngineStats:
        alloc, sched = self.pool.allocator, self.scheduler
        hit_rate = sched.reused_tokens / sched.prompt_tokens if sched.prompt_tokens else 0.0
        return EngineStats(len(sched.running), len(sched.waiting), alloc.num_used,
                           alloc.num_blocks, self.pool.block_size, alloc.num_cached, hit_rate)

    @torch.inference_mode()
    def step(self) -> list[TokenOutput]:
        """Run one scheduled step; return the tokens it produced."""
        plan = self.scheduler.schedule()
        if not plan:
            return []
        seqs = [seq for seq, _ in plan]
        tables, cached = [s.table for s in seqs], [s.cached for s in seqs]
        if all(n == 1 for _, n in plan):  # decode only: a (B, 1) batch, fused kernels apply
            ids = torch.tensor([[s.ids[s.cached]] for s in seqs], device=self.model.device)
            with self._adapters_for(plan):
                out = self.model(ids, cache=PagedBatch(self.pool, tables, cached, 1),
                                 last_only=True)
            out = out[:, -1]  # (B, vocab)
        else:  # prompt chunks (and decodes riding along): one packed row
            batch = PackedBatch(self.pool, tables, cached, [n for _, n in plan])
            plan = [plan[i] for i in batch.order]
            ids = torch.tensor([[t for s, n in plan for t in s.ids[s.cached:s.cached + n]]],
                               device=self.model.device)
            with self._adapters_for(plan):
                out = self.model(ids, cache=batch, keep=batch.last_tokens)[0]  # (len(seqs), V)
        ready, logits = [], []
        for row, (seq, n) in enumerate(plan):
            self.scheduler.commit(seq, n)
            if seq.pending == 0:  # all its tokens are cached: sample the next one
                ready.append(seq)
                logits.append(out[row])
        if not ready:
            return []
        picked = sample(torch.stack(logits), [s.params for s in ready], [s.state for s in ready])
        outputs = []
        for i, seq in enumerate(ready):
            token = picked.token_ids[i]
            seq.state.append(token)
            seq.output_ids.append(token)
            reason = ("stop" if token in seq.stops or seq.state.constraint_done else
                      "length" if len(seq.output_ids) >= seq.budget else None)
            if reason:
                self.scheduler.release(seq)
            outputs.append(TokenOutput(seq.request_id, token, picked.logprobs[i],
                                       picked.top_logprobs[i], reason, len(seq.prompt_ids)))
        return outputs

    def _adapters_for(self, plan: list[tuple[Sequence, int]]) -> AbstractContextManager:
        """Route each planned token to its sequence's adapter (in the order the tokens are
        fed); nothing to route when no sequence of the step has one."""
        if all(seq.adapter is None for seq, _ in plan):
            return nullcontext()
        return route_adapters(self.model, [seq.adapter for seq, n in plan for _ in range(n)])


def generate(model: Transformer, prompts: list[list[int]], params: list[SamplingParams],
             eos_ids: frozenset[int] = frozenset(), timings: Timings | None = None,
             cancelled: set[int] | None = None) -> Iterator[list[TokenEvent]]:
    """Run a fixed set of prompts through an engine sized for them; yield each step's tokens.

    The synchronous way to use the engine (CLI, scripts): same interface as
    `generate_tokens`. Prefill time is the time to the first token; decode time the rest.
    """
    if not prompts:
        raise InvalidRequestError("no prompts given")
    context = model.cfg.max_seq_len
    tokens = sum(len(p) + check_request(len(p), sp, context)
                 for p, sp in zip(prompts, params, strict=True))
    engine = Engine(model, eos_ids, EngineConfig(max_running=len(prompts),
                                                 max_waiting=len(prompts),
                                                 kv_cache_tokens=tokens))
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(str(i), p, sp)
    timings = timings if timings is not None else Timings()
    cancelled = cancelled if cancelled is not None else set()
    start, first = time.perf_counter(), True
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        if outputs and first:
            timings.prefill_tokens += sum(len(p) for p in prompts)
            timings.prefill_s += now - start
            first = False
        elif outputs:
            timings.decode_tokens += len(outputs)
            timings.decode_s += now - start
        start = now
        if outputs:
            yield [TokenEvent(int(o.request_id), o.token_id, o.logprob, o.top_logprobs,
                              o.finish_reason) for o in outputs]
        for index in cancelled:
            engine.abort(str(index))


class AsyncEngine:
    """Runs `Engine.step()` in a background thread and streams each request's tokens to asyncio.

    Requests and cancellations reach the worker through an inbox, so the event loop never waits
    for a step to finish; outputs come back through `loop.call_soon_threadsafe`.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Everything loaded so far (model, tokenizer, libraries) lives as long as the server:
        # frozen, it is no longer rescanned by the collector's full passes, which otherwise
        # take a few percent of a busy server's time (vLLM freezes its startup heap too).
        gc.freeze()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pagoda-engine", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None,
                       adapter: str | None = None) -> AsyncIterator[TokenOutput]:
        """Tokens of one request (with LoRA `adapter`, if named) as they are produced; closing
        the iterator cancels it."""
        request_id = request_id or uuid.uuid4().hex
        seq = self.engine.prepare(request_id, prompt_ids, params, adapter)  # bad-request errors
        stats = self.engine.stats
        if stats.waiting + self._inbox.qsize() >= self.engine.config.max_waiting:
            raise QueueFullError(f"the server is busy ({stats.waiting} requests waiting); "
                                 "retry shortly")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._send(("add", seq))
        finished = False
        try:
            while not finished:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finish_reason is not None
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    async def call(self, work: Callable[[Engine], object]) -> object:
        """Run `work(engine)` on the engine thread between two steps (e.g. loading an adapter
        while requests decode) and return its result or raise its error."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self._send(("call", (work, loop, done)))
        return await done

    def shutdown(self) -> None:
        """Stop the worker thread (pending requests are dropped)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _send(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wake.set()

    def _deliver(self, request_id: str, item: object) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, object]]) -> None:
        """Hand items to their requests' streams: one wake-up per event loop, not per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, puts in by_loop.items():
            loop.call_soon_threadsafe(_put_all, puts)

    def _call(self, work: Callable[[Engine], object], loop: asyncio.AbstractEventLoop,
              done: asyncio.Future) -> None:
        try:
            result = work(self.engine)
        except Exception as exc:  # delivered to the awaiting caller, not raised here
            loop.call_soon_threadsafe(_settle, done, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, done, result, None)

    def _run(self) -> None:
        while not self._stopping:
            while not self._inbox.empty():
                kind, payload = self._inbox.get()
                if kind == "abort":
                    self.engine.abort(payload)
                    continue
                if kind == "call":
                    self._call(*payload)
                    continue
                try:
                    self.engine.admit(payload)
                except QueueFullError as exc:
                    self._deliver(payload.request_id, exc)
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug must not hang every client: fail what is running
                for seq in [*self.engine.scheduler.running, *self.engine.scheduler.waiting]:
                    self.engine.abort(seq.request_id)
                    self._deliver(seq.request_id, exc)
                continue
            self._deliver_all([(out.request_id, out) for out in outputs])


def _put_all(puts: list[tuple[asyncio.Queue, object]]) -> None:
    for stream, item in puts:
        stream.put_nowait(item)


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    """Complete a future from the engine thread's report (unless its caller gave up)."""
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
