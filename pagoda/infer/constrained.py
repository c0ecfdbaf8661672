"""Constrained decoding: every token a sequence samples keeps its text a prefix of valid output.

Grammars are compiled by xgrammar (https://github.com/mlc-ai/xgrammar), the engine behind vLLM's,
SGLang's and TensorRT-LLM's structured outputs. Two objects, because a request's settings are
shared (n choices use one `SamplingParams`) while grammar state is not:

    factory = ConstraintFactory.for_tokenizer(tokenizer, model.cfg.vocab_size)
    constraint = factory.json_schema({"type": "object", ...})    # compiled, immutable, shareable
    params = SamplingParams(temperature=0.7, constraint=constraint)

    matcher = constraint.matcher()   # per sequence; the sampler does this itself:
    matcher.mask_logits(row)         #   -inf on every token the grammar forbids next   (V,)
    matcher.accept(token_id)         #   advance past the sampled token
    matcher.is_finished()            #   the value is complete: only EOS could follow

`SequenceSamplingState` makes the matcher, `sample()` masks each constrained row before picking
(greedy too) and `append()` accepts; the engine and `generate_tokens` end a sequence with
finish_reason "stop" as soon as its matcher is finished, without spending a step on EOS.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import xgrammar as xgr
from torch import Tensor

from pagoda.errors import ConfigError, InvalidRequestError
from pagoda.tokenizer import Tokenizer

# Compiled grammars kept per tokenizer (xgrammar's cache, keyed by schema text), in bytes.
COMPILED_CACHE_BYTES = 256 * 2**20
# `{"type": "object"}` without strict mode: any JSON object (OpenAI's json_object mode).
_ANY_OBJECT = {"type": "object"}
# xgrammar errors start with "[12:00:00] /path/file.cc:123: "; the rest is the readable part.
_LOG_PREFIX = re.compile(r"^\s*\[[\d:.]+\]\s+\S+:\d+:\s*")


class Constraint:
    """A compiled grammar: immutable, shared by every sequence (and thread) that uses it."""

    def __init__(self, compiled: xgr.CompiledGrammar, factory: ConstraintFactory,
                 description: str) -> None:
        self.compiled = compiled
        self.factory = factory
        self.description = description

    def matcher(self) -> ConstraintMatcher:
        """Fresh per-sequence state at the start of the grammar."""
        return ConstraintMatcher(self)

    def __repr__(self) -> str:
        return f"Constraint({self.description})"


class ConstraintMatcher:
    """Where one sequence is in its grammar; not thread-safe (one per sequence)."""

    def __init__(self, constraint: Constraint) -> None:
        factory = constraint.factory
        self.constraint = constraint
        self._matcher = xgr.GrammarMatcher(constraint.compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, factory.vocab_size)  # [1, ceil(V/32)]
        self._fresh = False  # _bitmask already holds the next-token mask of the current state
        self._stop_bits = factory.stop_bitmask
        self._vocab_size = factory.vocab_size

    def mask_logits(self, logits_row: Tensor) -> None:
        """Set the logits [V] of every token the grammar forbids next to -inf, in place."""
        bitmask = self._next_bitmask()
        if logits_row.device.type != "cpu":
            bitmask = bitmask.to(logits_row.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(
            logits_row[None], bitmask, vocab_size=self._vocab_size,
            backend="cpu" if logits_row.device.type == "cpu" else "torch_native")

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token; a token the grammar forbids is a bug (RuntimeError)."""
        if not self._matcher.accept_token(token_id):
            raise RuntimeError(f"token {token_id} breaks the constraint "
                               f"{self.constraint.description}; was the row masked?")
        self._fresh = False

    def is_finished(self) -> bool:
        """Whether the output is complete: nothing but an EOS/stop token may follow."""
        if self._matcher.is_terminated():
            return True
        if not self._matcher.is_completed():
            return False
        return not bool((self._next_bitmask() & ~self._stop_bits).any())

    def _next_bitmask(self) -> Tensor:
        """The allowed-token bitmask [1, ceil(V/32)] of the current state (computed once)."""
        if self._matcher.is_terminated():  # EOS accepted; rows that ride along may repeat it
            return self._stop_bits
        if not self._fresh:
            self._matcher.fill_next_token_bitmask(self._bitmask)
            self._fresh = True
        return self._bitmask


class ConstraintFactory:
    """Compiles constraints for one tokenizer and model vocabulary, caching compiled grammars.

    `vocab_size` is the model's (its logits width): ids the tokenizer lacks (padding rows of the
    embedding) and special tokens are never allowed; the tokenizer's EOS / end-of-turn ids are
    allowed exactly when the output is complete.
    """

    _instances: weakref.WeakKeyDictionary[Tokenizer, dict[int, ConstraintFactory]] = (
        weakref.WeakKeyDictionary())
    _lock = threading.Lock()

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None) -> None:
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.stop_ids = sorted(i for i in tokenizer.eos_ids if i < self.vocab_size)
        if not self.stop_ids:
            raise ConfigError("constrained decoding needs an EOS token; the tokenizer "
                              "has none inside the model's vocabulary")
        vocab_type, add_prefix_space = _vocab_type(tokenizer)
        encoded = [""] * self.vocab_size  # "" marks an id that is never text (padding, special)
        for token, i in tokenizer.backend.get_vocab(with_added_tokens=True).items():
            if i < self.vocab_size and i not in tokenizer.special_ids:
                encoded[i] = token
        self.info = xgr.TokenizerInfo(encoded, vocab_type, vocab_size=self.vocab_size,
                                      stop_token_ids=self.stop_ids,
                                      add_prefix_space=add_prefix_space)
        self.compiler = xgr.GrammarCompiler(self.info, cache_limit_bytes=COMPILED_CACHE_BYTES)
        self.stop_bitmask = _bitmask_of(self.stop_ids, self.vocab_size)  # [1, ceil(V/32)]

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, vocab_size: int | None = None
                      ) -> ConstraintFactory:
        """The shared factory of this tokenizer and vocabulary size (built on first use)."""
        size = vocab_size or tokenizer.vocab_size
        with cls._lock:
            per_size = cls._instances.setdefault(tokenizer, {})
            if size not in per_size:
                per_size[size] = cls(tokenizer, size)
            return per_size[size]

    def json_object(self) -> Constraint:
        """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        compiled = self.compiler.compile_json_schema(_ANY_OBJECT, strict_mode=False)
        return Constraint(compiled, self, "json_object")

    def json_schema(self, schema: Mapping[str, Any]) -> Constraint:
        """Output that validates against a JSON schema; a bad schema is an InvalidRequestError.

        Objects allow only the properties the schema names (xgrammar's strict mode, as OpenAI's
        strict structured outputs), which still validates against the schema as written.
        """
        if not isinstance(schema, Mapping):
            raise InvalidRequestError(
                f"a JSON schema must be a JSON object, got {type(schema).__name__}")
        try:
            text = json.dumps(schema, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(f"the JSON schema is not JSON: {e}") from None
        try:
            compiled = self.compiler.compile_json_schema(text)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError/InvalidJSONError
            raise InvalidRequestError(f"invalid JSON schema: {_one_line(e)}") from None
        title = schema.get("title")
        return Constraint(compiled, self, f"json_schema {title}" if title else "json_schema")

    def for_response_format(self, response_format: Mapping[str, Any] | None
                            ) -> Constraint | None:
        """The constraint of an OpenAI `response_format` (None for text or no format).

        {"type": "json_object"} -> any object; {"type": "json_schema", "json_schema": {"name":
        ..., "schema": {...}, "strict": ...}} -> that schema (always enforced).
        """
        if response_format is None:
            return None
        kind = response_format.get("type")
        if kind in (None, "text"):
            return None
        if kind == "json_object":
            return self.json_object()
        if kind == "json_schema":
            wrapper = response_format.get("json_schema")
            if not isinstance(wrapper, Mapping) or wrapper.get("schema") is None:
                raise InvalidRequestError(
                    "response_format of type 'json_schema' needs json_schema.schema "
                    '(e.g. {"type": "json_schema", "json_schema": {"name": "x", "schema": '
                    '{"type": "object"}}})')
            return self.json_schema(wrapper["schema"])
        raise InvalidRequestError(f"unknown response_format type {kind!r}; "
                                  "use 'text', 'json_object' or 'json_schema'")


def _vocab_type(tokenizer: Tokenizer) -> tuple[xgr.VocabType, bool]:
    """How vocabulary entries spell bytes, read from the decoder: (type, adds a prefix space)."""
    decoder = json.loads(tokenizer.backend.to_str()).get("decoder") or {}
    steps = (decoder.get("decoders") or []) if decoder.get("type") == "Sequence" else [decoder]
    kinds = {step.get("type") for step in steps}
    if "ByteLevel" in kinds:  # GPT-2 / Llama 3 / SmolLM2 / Qwen: bytes as printable characters
        return xgr.VocabType.BYTE_LEVEL, False
    if kinds & {"ByteFallback", "Metaspace"}:  # SentencePiece: '▁' spaces, <0xNN> bytes
        strips = any(s.get("type") == "Strip" and s.get("start", 0) > 0 for s in steps)
        metaspace = any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always")
                        != "never" for s in steps)
        return xgr.VocabType.BYTE_FALLBACK, strips or metaspace
    return xgr.VocabType.RAW, False


def _bitmask_of(ids: list[int], vocab_size: int) -> Tensor:
    """xgrammar's bitmask layout [1, ceil(V/32)] with exactly these ids allowed."""
    bits = torch.zeros(1, (vocab_size + 31) // 32 * 32, dtype=torch.bool)
    bits[0, ids] = True
    weights = torch.tensor([1 << k for k in range(32)], dtype=torch.int64)
    words = (bits.view(1, -1, 32).long() * weights).sum(-1)  # [1, W], values < 2^32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _one_line(error: BaseException, limit: int = 300) -> str:
    """xgrammar's message without its log prefix, on one line and at most `limit` characters."""
    text = " ".join(_LOG_PREFIX.sub("", str(error)).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
