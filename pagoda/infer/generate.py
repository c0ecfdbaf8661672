"""Token-level generation: prefill the prompts into a KV cache, then decode one token per step.

Token ids in, token ids out (nanochat's rule): text, chat templates and stop strings live in
`completion.py`. Prompts of different lengths share one batch by left padding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pagoda.errors import ContextLengthError, InvalidRequestError
from pagoda.infer.kernels import use_native_kernels
from pagoda.infer.sampling import SamplingParams, SequenceSamplingState, sample
from pagoda.model.kv_cache import KVCache
from pagoda.model.transformer import Transformer


@dataclass
class TokenEvent:
    """One generated token of sequence `index`; `finish_reason` is set on its last token."""

    index: int
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]]
    finish_reason: str | None = None  # "stop" (EOS/stop token) or "length"


@dataclass
class Timings:
    """Wall-clock split of a generation, as llama.cpp reports it."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
            "prefill_tok_s": round(self.prefill_tok_s, 2),
            "decode_tok_s": round(self.decode_tok_s, 2),
        }


def check_request(prompt_len: int, params: SamplingParams, context: int) -> int:
    """Validate one request against the context window; return its max new tokens."""
    params.validate()
    if prompt_len == 0:
        raise InvalidRequestError("the prompt is empty: give at least one token")
    if prompt_len >= context:
        raise ContextLengthError(
            f"the prompt has {prompt_len} tokens but the model's context "
            f"window is {context}; shorten the prompt"
        )
    room = context - prompt_len
    if params.max_tokens is not None and params.max_tokens > room:
        raise ContextLengthError(
            f"prompt ({prompt_len} tokens) + max_tokens "
            f"({params.max_tokens}) exceeds the context window of "
            f"{context} tokens; ask for at most {room} new tokens"
        )
    return params.max_tokens or room


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompts: list[list[int]],
    params: list[SamplingParams],
    eos_ids: frozenset[int] = frozenset(),
    timings: Timings | None = None,
    cancelled: set[int] | None = None,
) -> Iterator[list[TokenEvent]]:
    """Yield, per decode step, the new token of every still-running sequence.

    A sequence ends on an EOS/stop token (finish "stop") or after its max tokens ("length");
    the caller ends one early (a stop string) by adding its index to `cancelled`.
    """
    cancelled = cancelled if cancelled is not None else set()
    if not prompts:
        raise InvalidRequestError("no prompts given")
    use_native_kernels(model)
    context = model.cfg.max_seq_len
    budgets = [check_request(len(p), sp, context) for p, sp in zip(prompts, params, strict=True)]
    timings = timings if timings is not None else Timings()
    B, longest = len(prompts), max(len(p) for p in prompts)
    pad = [longest - len(p) for p in prompts]
    cache = KVCache(  # left padding can need more slots than the context (positions cannot)
        model.cfg,
        B,
        longest + max(budgets),
        pad=pad,
        device=model.device,
        dtype=model.dtype,
    )
    ids = torch.tensor(
        [[0] * n + p for n, p in zip(pad, prompts, strict=True)], device=model.device
    )  # (B, longest), left-padded
    states = [
        SequenceSamplingState.for_params(sp, p) for sp, p in zip(params, prompts, strict=True)
    ]
    stops = [set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(eos_ids)) for sp in params]
    produced = [0] * B
    running = set(range(B))

    start = time.perf_counter()
    logits = model(ids, cache=cache, last_only=True)[:, -1]  # (B, vocab)
    timings.prefill_tokens += sum(len(p) for p in prompts)
    timings.prefill_s += time.perf_counter() - start
    while True:
        start = time.perf_counter()
        picked = sample(logits, params, states)
        events = []
        for i in sorted(running):
            token = picked.token_ids[i]
            states[i].append(token)
            produced[i] += 1
            done = token in stops[i] or states[i].constraint_done  # EOS, stop id, or complete
            reason = "stop" if done else "length" if produced[i] >= budgets[i] else None
            events.append(TokenEvent(i, token, picked.logprobs[i], picked.top_logprobs[i], reason))
            if reason:
                running.discard(i)
        if running:  # decode time = sampling + the forward passes of the tokens fed back
            timings.decode_tokens += len(running)
            step = torch.tensor(picked.token_ids, device=model.device)[:, None]  # (B, 1)
            # finished rows ride along until the batch ends: keep them inside the position table
            positions = cache.positions(1).clamp_max(context - 1)  # (B, 1)
            logits = model(step, cache=cache, last_only=True, positions=positions)[:, -1]
        timings.decode_s += time.perf_counter() - start
        yield events
        running -= cancelled
        if not running:
            return
