"""Text on top of the engine: streamed detokenization, stop strings, finished completions."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from pagoda.infer.engine import generate
from pagoda.infer.generate import Timings, TokenEvent
from pagoda.infer.sampling import SamplingParams
from pagoda.infer.stop import StopChecker
from pagoda.model.transformer import Transformer
from pagoda.tokenizer import StreamDecoder, Tokenizer


@dataclass
class TextDelta:
    """New text of sequence `index` (may be '' while a character or stop string is pending)."""

    index: int
    text: str
    token: TokenEvent
    finish_reason: str | None = None


@dataclass
class Completion:
    """One finished sequence: its text (stop string excluded), tokens and why it ended."""

    index: int
    prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None


class SequenceText:
    """Detokenizer + stop-string matcher of one sequence (used by every text-producing layer)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.checker = StopChecker(stop)

    def push(self, token_id: int, last: bool) -> tuple[str, bool]:
        """Text safe to show after this token, and whether a stop string was hit."""
        text, hit = self.checker.push(self.decoder.push(token_id))
        if hit or not last:
            return text, hit
        tail, hit = self.checker.push(self.decoder.flush())
        return text + tail + ("" if hit else self.checker.flush()), hit


def stream_text(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    params: list[SamplingParams],
    timings: Timings | None = None,
) -> Iterator[TextDelta]:
    """Generate for every prompt at once, yielding text deltas as tokens arrive."""
    texts = [SequenceText(tokenizer, sp.stop) for sp in params]
    cancelled: set[int] = set()
    for events in generate(model, prompts, params, tokenizer.eos_ids, timings, cancelled):
        for event in events:
            text, hit = texts[event.index].push(
                event.token_id, last=event.finish_reason is not None
            )
            reason = "stop" if hit else event.finish_reason
            if hit:
                cancelled.add(event.index)
            yield TextDelta(event.index, text, event, reason)


def complete(
    model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], params: list[SamplingParams]
) -> tuple[list[Completion], Timings]:
    """Generate to the end for every prompt; return the completions and timings."""
    timings = Timings()
    done = [Completion(i, len(p)) for i, p in enumerate(prompts)]
    for delta in stream_text(model, tokenizer, prompts, params, timings):
        c = done[delta.index]
        c.text += delta.text
        c.token_ids.append(delta.token.token_id)
        c.logprobs.append(delta.token.logprob)
        c.top_logprobs.append(delta.token.top_logprobs)
        c.finish_reason = delta.finish_reason
    return done, timings
