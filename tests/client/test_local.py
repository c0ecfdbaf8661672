"""In-process clients: chat over the engine (stop strings, lengths, usage) and embeddings."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from pagoda.client import LocalChat, LocalEmbeddings
from pagoda.infer.engine import AsyncEngine, Engine
from pagoda.tokenizer.chat import encode_chat

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def chat(smol):
    """LocalChat over a tiny random model that speaks SmolLM2's vocabulary (fast, greedy)."""
    import torch

    from pagoda.model.config import ModelConfig
    from pagoda.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-llama", vocab_size=smol.tokenizer.vocab_size,
                                max_seq_len=256, init_std=0.3)
    engine = AsyncEngine(Engine(Transformer(cfg).eval(), frozenset()))  # no EOS: runs to length
    client = LocalChat(engine, smol.tokenizer, "tiny", owns_engine=True)
    yield client
    asyncio.run(client.close())


def test_chat_runs_to_max_tokens_and_reports_usage(chat, smol):
    reply = asyncio.run(chat.chat(MESSAGES, max_tokens=12))
    assert reply.finish_reason == "length" and reply.completion_tokens == 12
    assert reply.prompt_tokens == len(encode_chat(smol.tokenizer, MESSAGES, True).ids)
    assert reply.text and reply == asyncio.run(chat.chat(MESSAGES, max_tokens=12))  # greedy


def test_stop_string_ends_the_reply_before_it(chat):
    full = asyncio.run(chat.chat(MESSAGES, max_tokens=24)).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    reply = asyncio.run(chat.chat(MESSAGES, max_tokens=24, stop=[stop]))
    assert reply.finish_reason == "stop"
    assert reply.text == full[:full.index(stop)]
    assert reply.completion_tokens < 24
    deadline = time.monotonic() + 5  # the stopped generation is cancelled (asynchronously)
    while chat.engine.stats.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert chat.engine.stats.running == 0 and chat.engine.stats.kv_blocks_used == 0


def test_top_logprobs_of_the_first_token(chat, smol):
    reply = asyncio.run(chat.chat(MESSAGES, max_tokens=3, top_logprobs=5))
    first = reply.first_token_logprobs
    assert len(first) == 5 and [lp for _, lp in first] == sorted((lp for _, lp in first),
                                                                 reverse=True)
    assert reply.text.startswith(first[0][0])  # greedy: the likeliest token is the one produced
    assert asyncio.run(chat.chat(MESSAGES, max_tokens=3)).first_token_logprobs == []


def test_local_embeddings(minilm):
    from pagoda.infer.embed import EmbeddingEngine
    from pagoda.infer.embed_worker import AsyncEmbedder

    engine = EmbeddingEngine(minilm.model, minilm.tokenizer, "minilm-l6", minilm.max_tokens)
    client = LocalEmbeddings(AsyncEmbedder(engine), owns_worker=True)
    texts = ["one small text", "and another, a little longer than the first"]

    async def run():
        got = await client.embed(texts)
        await client.close()
        return got

    got = asyncio.run(run())
    np.testing.assert_allclose(got, engine.embed(texts), atol=1e-6)
    assert client.model == "minilm-l6" and client.dimension == 384
    assert client.max_tokens == 254  # 256 minus [CLS] and [SEP]
    assert client.count_tokens("hello world") == 2
