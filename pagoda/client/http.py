"""Clients for any OpenAI-compatible HTTP endpoint (`base_url` ending in /v1, as the OpenAI SDK
takes it): our own server, vLLM, llama.cpp's server, DeepSeek's API."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np

from pagoda.client.base import ChatReply
from pagoda.errors import ClientError
from pagoda.tokenizer.approx import approx_tokens


class _Endpoint:
    """One base URL with its key: POST JSON, return JSON, turn every failure into ClientError."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(headers=headers, timeout=timeout)

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}/{path}"
        try:
            response = await self.http.post(url, json=body)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {url}: {exc}") from exc
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code >= 400 or not isinstance(data, dict):
            error = data.get("error") if isinstance(data, dict) else None
            detail = error.get("message") if isinstance(error, dict) else response.text[:200]
            raise ClientError(f"{url} answered {response.status_code}: {detail}")
        return data

    async def close(self) -> None:
        await self.http.aclose()


class HTTPChat:
    """Chat completions from a remote OpenAI-compatible server."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout: float = 300.0) -> None:
        self.model = model
        self.endpoint = _Endpoint(base_url, api_key, timeout)

    async def chat(self, messages: list[dict[str, str]], *, max_tokens: int = 512,
                   temperature: float = 0.0, stop: list[str] | None = None,
                   top_logprobs: int = 0) -> ChatReply:
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "max_tokens": max_tokens, "temperature": temperature}
        if stop:
            body["stop"] = stop
        if top_logprobs:
            body.update(logprobs=True, top_logprobs=top_logprobs)
        data = await self.endpoint.post("chat/completions", body)
        try:
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return ChatReply(choice["message"]["content"] or "", choice.get("finish_reason") or
                             "stop", usage.get("prompt_tokens", 0),
                             usage.get("completion_tokens", 0), _first_token_logprobs(choice))
        except (KeyError, IndexError, TypeError) as exc:
            raise ClientError(f"{self.endpoint.base_url} sent a malformed chat completion: "
                              f"missing {exc}") from exc

    async def close(self) -> None:
        await self.endpoint.close()


def _first_token_logprobs(choice: dict[str, Any]) -> list[tuple[str, float]]:
    """The first token's alternatives from an OpenAI `logprobs` block; empty when the server
    sent none (not every OpenAI-compatible server implements them)."""
    content = (choice.get("logprobs") or {}).get("content") or []
    if not content:
        return []
    return [(alt["token"], float(alt["logprob"])) for alt in content[0].get("top_logprobs") or []]


class HTTPEmbeddings:
    """Embeddings from a remote OpenAI-compatible server (token counts are approximate)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 max_tokens: int = 256, timeout: float = 300.0) -> None:
        self.model = model
        self._max_tokens = max_tokens
        self.endpoint = _Endpoint(base_url, api_key, timeout)

    @property
    def max_tokens(self) -> int:
        return self._max_tokens

    def count_tokens(self, text: str) -> int:
        return approx_tokens(text)

    async def embed(self, texts: list[str]) -> np.ndarray:
        data = await self.endpoint.post("embeddings", {"model": self.model, "input": list(texts),
                                                       "encoding_format": "float"})
        try:
            rows = sorted(data["data"], key=lambda d: d["index"])
            vectors = np.asarray([row["embedding"] for row in rows], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise ClientError(f"{self.endpoint.base_url} sent malformed embeddings: {exc}") from exc
        if vectors.ndim != 2 or len(vectors) != len(texts):
            raise ClientError(f"{self.endpoint.base_url} returned {len(vectors)} embeddings for "
                              f"{len(texts)} inputs")
        return vectors

    async def close(self) -> None:
        await self.endpoint.close()
