"""`POST /v1/embeddings`: OpenAI's format through the official SDK, same vectors as the encoder."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest

pytestmark = pytest.mark.real_model

TEXTS = ["The cat sat on the mat.", "A kitten is resting on a rug.",
         "Interest rates rose sharply this quarter."]


@pytest.fixture(scope="module")
def reference(minilm) -> np.ndarray:
    from pagoda.infer.embed import EmbeddingEngine

    engine = EmbeddingEngine(minilm.model, minilm.tokenizer, "minilm-l6", minilm.max_tokens)
    return engine.embed(TEXTS)


def test_float_and_base64_embeddings_match_the_encoder(tiny_server, reference):
    client = tiny_server.openai()
    got = client.embeddings.create(model="minilm-l6", input=TEXTS)
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == "minilm-l6"
    vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    assert got.usage.prompt_tokens == got.usage.total_tokens > 10
    cos = vectors @ vectors.T
    assert cos[0, 1] > cos[0, 2] + 0.3  # the paraphrase is nearer than the unrelated sentence

    raw = tiny_server.http.post("/v1/embeddings", json={
        "model": "text-embedding-3-small", "input": TEXTS[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, reference[0], atol=1e-5)


def test_concurrent_requests_are_batched_and_each_gets_its_own(tiny_server, reference):
    import concurrent.futures as cf

    client = tiny_server.openai()
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: client.embeddings.create(
            model="minilm-l6", input=TEXTS[i % 3]).data[0].embedding, range(24)))
    for i, vector in enumerate(results):
        np.testing.assert_allclose(vector, reference[i % 3], atol=1e-5)


@pytest.mark.parametrize(("body", "status", "param", "words"), [
    ({"model": "minilm-l6", "input": []}, 400, "input", "empty"),
    ({"model": "minilm-l6", "input": ["ok", "  "]}, 400, "input", "input 1 is empty"),
    ({"model": "minilm-l6", "input": [1, 2, 3]}, 400, "input", "token-id"),
    ({"model": "minilm-l6", "input": "x", "dimensions": 8}, 400, "dimensions", "384"),
    ({"model": "minilm-l6", "input": "x", "encoding_format": "int8"}, 400, None, None),
    ({"model": "nope", "input": "x"}, 404, "model", "minilm-l6"),
    ({"input": "x"}, 400, None, "model"),
])
def test_bad_requests_get_openai_errors(tiny_server, body, status, param, words):
    response = tiny_server.http.post("/v1/embeddings", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param:
        assert error["param"] == param
    if words:
        assert words in error["message"]


def test_sdk_raises_not_found(tiny_server):
    with pytest.raises(openai.NotFoundError):
        tiny_server.openai().embeddings.create(model="nope", input="x")
