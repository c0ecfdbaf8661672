"""EmbeddingEngine on the real all-MiniLM-L6-v2: parity with sentence-transformers on the same
weights (cosine >= 0.9999 on 100 real texts), batching, truncation and bad input."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pagoda.errors import ConfigError, InvalidRequestError
from pagoda.infer.embed import EmbeddingEngine
from pagoda.model.config import ModelConfig
from pagoda.model.transformer import Transformer

pytestmark = pytest.mark.real_model
SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare/input.txt"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """The first 100 speeches of tinyshakespeare (speaker line dropped): from two words to a
    monologue of 240 tokens, so batches mix lengths."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is missing")
    blocks = SHAKESPEARE.read_text().split("\n\n")
    speeches = (" ".join(block.splitlines()[1:]) for block in blocks)
    return [speech for speech in speeches if speech][:100]


@pytest.fixture(scope="module")
def engine(minilm) -> EmbeddingEngine:
    return EmbeddingEngine(minilm.model, minilm.tokenizer, name="minilm-l6",
                           max_tokens=minilm.max_tokens)


@pytest.fixture(scope="module")
def reference(minilm):
    """sentence-transformers' all-MiniLM pipeline, built from the same pulled folder (no hub)."""
    st = pytest.importorskip("sentence_transformers")
    try:  # sentence-transformers >= 6; `models` before
        from sentence_transformers.sentence_transformer import modules
    except ImportError:
        from sentence_transformers import models as modules
    word = modules.Transformer(str(minilm.path), max_seq_length=256)
    pooling = modules.Pooling(384, pooling_mode="mean")
    return st.SentenceTransformer(modules=[word, pooling, modules.Normalize()], device="cpu")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_matches_sentence_transformers(engine, reference, texts):
    """The 100 speeches, plus three passages long enough to be cut at the 256-token window."""
    inputs = texts + [" ".join(texts[i:i + 30]) for i in (0, 30, 60)]
    assert sum(engine.count_tokens(t) > engine.max_tokens for t in inputs) == 3
    ours = engine.embed(inputs)
    theirs = reference.encode(inputs, batch_size=32, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (103, 384)
    assert cosines(ours, theirs).min() >= 0.9999


def test_vectors_are_unit_float32_in_input_order(engine, texts):
    vectors = engine.embed(texts[:10])
    assert vectors.dtype == np.float32 and vectors.shape == (10, engine.dimension)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(engine.embed(texts[:10][::-1]), vectors[::-1], atol=1e-6)
    assert cosines(vectors[:1], vectors[1:2])[0] < 0.99  # different texts, different vectors


def test_batching_and_padding_do_not_change_vectors(engine, texts):
    together = engine.embed(texts[:24])
    for batch_size in (1, 5):
        split = EmbeddingEngine(engine.model, engine.tokenizer, engine.name,
                                max_tokens=engine.window, batch_size=batch_size)
        np.testing.assert_allclose(split.embed(texts[:24]), together, atol=2e-6)


def test_long_texts_are_cut_to_the_window(engine, texts):
    long = " ".join(texts)
    assert engine.window == 256 and engine.max_tokens == 254  # [CLS] and [SEP] take two
    assert engine.count_tokens(long) > 1000
    a, b = engine.embed([long, long + " and a tail past the window"])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_token_counts_leave_out_special_tokens(engine):
    assert engine.count_tokens("Hello world") == 2
    assert engine.count_tokens("Hello world, again") == 2 + engine.count_tokens(", again")
    assert (engine.name, engine.dimension) == ("minilm-l6", 384)


@pytest.mark.parametrize("bad, message", [
    ([], "empty"),
    ("one string", "list of texts"),
    (["fine", ""], "input 1 is empty"),
    (["fine", " \n "], "input 1 is empty"),
    (["fine", None], "input 1 is a NoneType"),
])
def test_bad_input_is_an_invalid_request(engine, bad, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine.embed(bad)


def test_a_language_model_is_refused(minilm):
    torch.manual_seed(0)
    decoder = Transformer(ModelConfig.from_name("tiny-llama"))
    with pytest.raises(ConfigError, match="not an encoder"):
        EmbeddingEngine(decoder, minilm.tokenizer, name="tiny-llama")
