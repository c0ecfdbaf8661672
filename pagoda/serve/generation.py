"""The bridge between one API request and the engine: n engine requests, merged into one stream
of per-choice text deltas, with stop strings applied and metrics recorded.

The HTTP layer never touches tensors: it sends token ids to `AsyncEngine.generate` and turns the
`TokenOutput`s it yields into text with `SequenceText` (detokenizer + stop strings). A stop
string ends its choice by closing that generator, which aborts the engine request and frees its
KV blocks; so does a client that disconnects (its task is cancelled and `close()` runs).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pagoda.infer.completion import SequenceText
from pagoda.infer.sampling import SamplingParams
from pagoda.serve.metrics import ServeMetrics
from pagoda.tokenizer import Tokenizer


@dataclass
class ChoiceEvent:
    """New text of choice `index` after one token (text may be '' while a stop string or a
    character is pending); `finish_reason` is set on the choice's last event."""

    index: int
    text: str
    token_id: int | None
    logprob: float | None
    top_logprobs: list[tuple[int, float]]
    finish_reason: str | None


class ChoiceStreams:
    """The engine requests of one API call (n choices × prompts), merged into one event stream.

    Use: `await start(...)` (raises the engine's admission errors: invalid request, context
    length, queue full, with nothing left running), then iterate `events()`, and always
    `await close()` (idempotent; aborts whatever still runs).
    """

    def __init__(self, engine: Any, tokenizer: Tokenizer, metrics: ServeMetrics,
                 started: float | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.started = started if started is not None else time.perf_counter()
        self.gens: list[Any] = []
        self.tasks: list[asyncio.Task] = []
        self.queue: asyncio.Queue = asyncio.Queue()
        self.completion_tokens = 0
        self.first_token_s: float | None = None
        self.finish_reasons: dict[int, str] = {}

    async def start(self, prompts: list[list[int]], params: list[SamplingParams],
                    request_id: str, adapter: str | None = None) -> None:
        """Submit every request (with LoRA `adapter`, if any) and wait for each one's first
        token (errors surface here)."""
        self.texts = [SequenceText(self.tokenizer, p.stop) for p in params]
        self.gens = [self.engine.generate(ids, p, request_id=f"{request_id}-{i}", adapter=adapter)
                     for i, (ids, p) in enumerate(zip(prompts, params, strict=True))]
        self._last = [self.started] * len(self.gens)
        try:
            firsts = await asyncio.gather(*(anext(g) for g in self.gens),
                                          return_exceptions=True)
        except BaseException:
            await self.close()
            raise
        errors = [f for f in firsts if isinstance(f, BaseException)]
        if errors:
            await self.close()
            error = errors[0]
            if isinstance(error, StopAsyncIteration):
                raise RuntimeError("the engine ended a request without producing a token")
            raise error
        self.tasks = [asyncio.create_task(self._pump(i, first)) for i, first in enumerate(firsts)]

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        """Events of all choices as they arrive, until every choice has finished."""
        remaining = len(self.tasks)
        while remaining:
            event = await self.queue.get()
            if isinstance(event, BaseException):
                raise event
            if event.finish_reason is not None:
                remaining -= 1
            yield event

    async def close(self) -> None:
        """Abort every request still running and wait until its generator is closed."""
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for gen in self.gens:
            try:
                await gen.aclose()
            except (RuntimeError, StopAsyncIteration):  # already running/closed elsewhere
                pass

    async def _pump(self, index: int, out: Any) -> None:
        """Turn one engine request's tokens into events until it finishes or a stop hits."""
        gen = self.gens[index]
        try:
            while True:
                event = self._event(index, out)
                self.queue.put_nowait(event)
                if event.finish_reason is not None:
                    return
                try:
                    out = await anext(gen)
                except StopAsyncIteration:  # ended without a finish reason: treat as stop
                    self.queue.put_nowait(ChoiceEvent(index, "", None, None, [], "stop"))
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # surface engine failures to the consumer
            self.queue.put_nowait(exc)
        finally:
            await gen.aclose()

    def _event(self, index: int, out: Any) -> ChoiceEvent:
        now = time.perf_counter()
        if self.first_token_s is None:
            self.first_token_s = now - self.started
            self.metrics.ttft.observe(self.first_token_s)
        elif self._last[index] != self.started:
            self.metrics.itl.observe(now - self._last[index])
        self._last[index] = now
        self.completion_tokens += 1
        self.metrics.generation_tokens.inc()
        text, hit = self.texts[index].push(out.token_id, last=out.finish_reason is not None)
        finish = "stop" if hit else out.finish_reason
        if finish is not None:
            self.finish_reasons[index] = finish
        return ChoiceEvent(index, text, out.token_id, out.logprob, list(out.top_logprobs or ()),
                           finish)


# ----------------------------------------------------------- token strings
_BYTE_LEVEL: dict[str, int] | None = None


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable-character -> byte table (the inverse of bytes_to_unicode)."""
    global _BYTE_LEVEL
    if _BYTE_LEVEL is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
            list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_LEVEL = {chr(c): b for b, c in zip(bs, cs, strict=True)}
    return _BYTE_LEVEL


class TokenStrings:
    """Text and UTF-8 bytes of single tokens, as OpenAI's logprobs report them (cached)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.lookup = lru_cache(maxsize=65536)(self._lookup)

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token_id])
        raw = None
        piece = self.tokenizer.id_to_token(token_id)
        table = _byte_level_decoder()
        if piece and "\ufffd" in text and all(ch in table for ch in piece):
            raw = bytes(table[ch] for ch in piece)
        if raw is None:
            raw = text.encode("utf-8")
        if "\ufffd" in text:  # a partial character: show its bytes, as vLLM does
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, list(raw)

    def text(self, token_id: int) -> str:
        """The token as text (`bytes:\\x..` for part of a character)."""
        return self.lookup(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        """The token's UTF-8 bytes."""
        return self.lookup(token_id)[1]

    def chat_entry(self, token_id: int, logprob: float,
                   top: list[tuple[int, float]]) -> dict[str, Any]:
        """One element of a chat choice's `logprobs.content`."""
        return {
            "token": self.text(token_id), "logprob": logprob, "bytes": self.bytes(token_id),
            "top_logprobs": [{"token": self.text(t), "logprob": lp, "bytes": self.bytes(t)}
                             for t, lp in top],
        }

    def top_dict(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """Legacy completions' `top_logprobs` entry: token text -> logprob (best first)."""
        out: dict[str, float] = {}
        for t, lp in top:
            out.setdefault(self.text(t), lp)
        return out
