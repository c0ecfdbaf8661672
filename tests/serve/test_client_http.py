"""pagoda.client's HTTP clients against a live Pagoda server (any OpenAI-compatible one works)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pagoda.client import HTTPChat, HTTPEmbeddings
from pagoda.errors import ClientError

pytestmark = pytest.mark.real_model


def run(coro):
    return asyncio.run(coro)


def test_http_chat_and_embeddings(tiny_server):
    async def go():
        chat = HTTPChat(f"{tiny_server.base_url}/v1", "deepseek-chat")
        emb = HTTPEmbeddings(f"{tiny_server.base_url}/v1", "minilm-l6")
        try:
            reply = await chat.chat([{"role": "user", "content": "Hi"}], max_tokens=5)
            scored = await chat.chat([{"role": "user", "content": "Hi"}], max_tokens=1,
                                     top_logprobs=4)
            vectors = await emb.embed(["a cat", "a dog"])
        finally:
            await chat.close()
            await emb.close()
        return reply, vectors, scored

    reply, vectors, scored = run(go())
    assert len(scored.first_token_logprobs) == 4
    assert scored.first_token_logprobs[0][0] == scored.text
    assert reply.completion_tokens <= 5 and reply.finish_reason in {"stop", "length"}
    assert reply.prompt_tokens > 0
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_http_errors_are_one_line_client_errors(tiny_server):
    async def ask(base: str, model: str = "deepseek-chat"):
        chat = HTTPChat(base, model, timeout=5)
        try:
            return await chat.chat([{"role": "user", "content": "Hi"}])
        finally:
            await chat.close()

    with pytest.raises(ClientError, match="404.*does not exist"):
        run(ask(f"{tiny_server.base_url}/v1", model="no-such-model"))
    with pytest.raises(ClientError, match="cannot reach"):
        run(ask("http://127.0.0.1:9/v1"))  # nothing listens on the discard port
