"""`POST /v1/embeddings` in OpenAI's format, over the in-process embedding client.

The embedding model is pulled and loaded on the first request (the chat model alone is what
/ready waits for), then shared by every request; concurrent requests are batched together on
its worker thread (`infer.embed_worker.AsyncEmbedder`).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
from fastapi import APIRouter

from pagoda.client import LocalEmbeddings
from pagoda.errors import InvalidRequestError, ModelNotFoundError
from pagoda.infer.embed import check_texts
from pagoda.serve.errors import with_param
from pagoda.serve.schemas import EmbeddingList, EmbeddingRequest, ErrorResponse

MAX_INPUTS = 2048  # OpenAI's limit per request


class EmbedderSlot:
    """The server's embedding client, created on first use and closed with the app."""

    def __init__(self, name: str, aliases: list[str]) -> None:
        self.name = name
        self.accepted = {name, *aliases}
        self.client: LocalEmbeddings | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> LocalEmbeddings:
        async with self._lock:
            if self.client is None:
                self.client = await asyncio.to_thread(LocalEmbeddings.load, self.name)
            return self.client

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    def check_model(self, model: str) -> None:
        if model not in self.accepted:
            raise with_param(ModelNotFoundError(
                f"The embedding model '{model}' does not exist. This server embeds with "
                f"'{self.name}'."), "model")


def build_embeddings_router(slot: EmbedderSlot, guard: list[Any]) -> APIRouter:
    """The /v1/embeddings route of one app."""
    router = APIRouter()

    @router.post("/v1/embeddings", dependencies=guard,
                 responses={200: {"model": EmbeddingList},
                            **{c: {"model": ErrorResponse} for c in (400, 401, 404, 429)}})
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        """OpenAI embeddings: unit-length vectors, as floats or base64."""
        slot.check_model(body.model)
        texts = _texts(body.input)
        client = await slot.get()
        if body.dimensions is not None and body.dimensions != client.dimension:
            raise with_param(InvalidRequestError(
                f"{slot.name} makes {client.dimension}-dimensional embeddings; "
                f"dimensions={body.dimensions} is not supported"), "dimensions")
        vectors = await client.embed(texts)
        tokens = sum(min(client.count_tokens(t), client.max_tokens) for t in texts)
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return router


def _texts(raw: str | list) -> list[str]:
    """The request's texts, or a 400 saying what is wrong with `input`; checked here, before
    they join a batch on the embedding worker."""
    texts = [raw] if isinstance(raw, str) else raw
    if any(not isinstance(t, str) for t in texts):
        raise with_param(InvalidRequestError("token-id input is not supported: send text"),
                         "input")
    if len(texts) > MAX_INPUTS:
        raise with_param(InvalidRequestError(f"'input' has {len(texts)} items; at most "
                                             f"{MAX_INPUTS} per request"), "input")
    try:
        return check_texts(texts)
    except InvalidRequestError as exc:
        raise with_param(exc, "input") from None


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":  # OpenAI's: the raw little-endian float32 bytes
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
