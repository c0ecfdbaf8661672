"""The two interfaces every model client implements, and what a chat call returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class ChatReply:
    """A finished chat completion."""

    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    # With `top_logprobs=n`: the n likeliest first tokens (text, logprob), likeliest first;
    # what pointwise scoring (e.g. reranking by yes/no) reads.
    first_token_logprobs: list[tuple[str, float]] = field(default_factory=list)


class ChatClient(Protocol):
    """Answers a conversation (OpenAI chat messages: role + content)."""

    model: str

    async def chat(self, messages: list[dict[str, str]], *, max_tokens: int = 512,
                   temperature: float = 0.0, stop: list[str] | None = None,
                   top_logprobs: int = 0) -> ChatReply: ...

    async def close(self) -> None: ...


class EmbeddingClient(Protocol):
    """Turns texts into unit vectors of one fixed dimension."""

    model: str

    async def embed(self, texts: list[str]) -> np.ndarray:
        """float32 (len(texts), dimension), rows in input order."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens the embedder reads for `text` (exact in-process, approximate over HTTP)."""
        ...

    @property
    def max_tokens(self) -> int:
        """Longest text (in `count_tokens` tokens) embedded whole; chunks should fit in it."""
        ...

    async def close(self) -> None: ...
