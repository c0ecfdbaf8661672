"""Knowledge bases with the real MiniLM embedder and Milvus Lite: idempotent ingest, crash safety,
retrieval, grounded answers with citations, ownership and bad input."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pagoda.client import ChatReply, LocalEmbeddings
from pagoda.errors import DocumentError, InvalidRequestError
from pagoda.rag import kb as kb_module
from pagoda.rag.answer import NOT_FOUND, ask
from pagoda.rag.kb import KnowledgeBaseExistsError, KnowledgeBaseNotFoundError, KnowledgeBases
from pagoda.rag.milvus_store import MilvusDatabase

pytestmark = pytest.mark.real_model

CITIES = """# Capitals

Paris is the capital of France. It lies on the Seine and is known for the Eiffel Tower.

Canberra is the capital of Australia. It was chosen as a compromise between Sydney and Melbourne.
"""
ANIMALS = """# Animals

The axolotl is a salamander from the lakes of Mexico City. It can regrow lost limbs, and it keeps
its larval gills all its life.
"""


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def embedder(minilm):
    from pagoda.infer.embed import EmbeddingEngine
    from pagoda.infer.embed_worker import AsyncEmbedder

    engine = EmbeddingEngine(minilm.model, minilm.tokenizer, "minilm-l6", minilm.max_tokens)
    return LocalEmbeddings(AsyncEmbedder(engine))


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    database = MilvusDatabase(tmp_path_factory.mktemp("milvus") / "kb.db")
    yield database
    database.close()


@pytest.fixture
def kbs(db, tmp_path):
    return KnowledgeBases(db, tmp_path / "kb")


def files(tmp_path: Path) -> tuple[Path, Path]:
    cities, animals = tmp_path / "cities.md", tmp_path / "animals.md"
    cities.write_text(CITIES)
    animals.write_text(ANIMALS)
    return cities, animals


class FakeChat:
    """A chat model that answers with a fixed text and records the prompts it got."""

    model = "fake"

    def __init__(self, text: str) -> None:
        self.text = text
        self.prompts: list[list[dict[str, str]]] = []

    async def chat(self, messages, **_) -> ChatReply:
        self.prompts.append(messages)
        return ChatReply(self.text, "stop", 10, 5)


def test_ingest_is_incremental_and_idempotent(kbs, embedder, tmp_path):
    cities, animals = files(tmp_path)
    kb = kbs.create("geo", embedder, embedder.dimension)
    seen: list[tuple[int, int]] = []
    first = run(kb.add_file(cities, progress=lambda done, total: seen.append((done, total))))
    assert first.status == "added" and first.chunks >= 1 and seen[-1] == (first.chunks,) * 2
    assert run(kb.add_file(cities)).status == "unchanged"
    run(kb.add_file(animals))
    total = kb.store.count()
    assert total == sum(d.chunks for d in kb.documents())

    cities.write_text(CITIES.replace("Seine", "river Seine"))
    again = run(kb.add_file(cities))
    assert again.status == "updated"
    assert kb.store.count() == total  # the old version's chunks are gone
    hits = run(kb.query("Which river flows through Paris?", k=1))
    assert "river Seine" in hits[0].text and hits[0].meta.source == str(cities)

    kb.remove(str(animals))
    assert kb.store.count() == again.chunks
    with pytest.raises(InvalidRequestError, match="no document"):
        kb.remove(str(animals))
    reopened = KnowledgeBases(kbs.db, kbs.root).open("geo", embedder)
    assert [d.source for d in reopened.documents()] == [str(cities)]


def test_a_crash_mid_ingest_leaves_the_previous_version(kbs, embedder, tmp_path, monkeypatch):
    cities, _ = files(tmp_path)
    kb = kbs.create("crash", embedder, embedder.dimension, chunk_size=24, chunk_overlap=4)
    before = run(kb.add_file(cities)).chunks
    monkeypatch.setattr(kb_module, "EMBED_BATCH", 1)
    calls = {"n": 0}
    real = embedder.embed

    async def dying(texts):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("power cut")
        return await real(texts)

    monkeypatch.setattr(embedder, "embed", dying)
    cities.write_text(CITIES.replace("Paris", "Lutetia"))
    with pytest.raises(RuntimeError):
        run(kb.add_file(cities))  # one chunk of the new version was stored, then the "crash"
    monkeypatch.setattr(embedder, "embed", real)
    assert kb.store.count() == before + 1  # a stray new chunk...
    hits = run(kb.query("capital of France", k=3))
    assert all("Lutetia" not in h.text for h in hits)  # ...that is never searched
    recovered = KnowledgeBases(kbs.db, kbs.root).open("crash", embedder)
    assert recovered.store.count() == before  # and is deleted when the KB is opened again
    assert recovered.manifest.pending == []


def test_search_modes_and_answers_with_citations(kbs, embedder, tmp_path):
    cities, animals = files(tmp_path)
    kb = kbs.create("answers", embedder, embedder.dimension)
    run(kb.add_file(cities))
    run(kb.add_file(animals))
    for mode in ("hybrid", "dense", "keyword"):
        hits = run(kb.query("axolotl gills", k=2, mode=mode))
        assert hits[0].meta.source == str(animals), mode

    chat = FakeChat("It can regrow lost limbs [1].")
    answer = run(ask(kb, chat, "What can the axolotl regrow?"))
    assert answer.found and answer.text == "It can regrow lost limbs [1]."
    assert [c.source for c in answer.citations] == [str(animals)]
    assert "axolotl" in answer.citations[0].text and answer.citations[0].n == 1
    prompt = chat.prompts[0][1]["content"]
    assert "[1] (" + str(animals) in prompt and "Question: What can the axolotl regrow?" in prompt

    absent = run(ask(kb, chat, "What is the boiling point of tungsten in kelvin?"))
    assert absent.text == NOT_FOUND and not absent.found and absent.citations == []
    assert len(chat.prompts) == 1  # the model was not asked


def test_ownership_names_and_bad_input(kbs, embedder, tmp_path):
    kb = kbs.create("hr-policies", embedder, embedder.dimension, owner="key-a")
    assert [m.name for m in kbs.list("key-a")] == ["hr-policies"]
    assert kbs.list("key-b") == [] and kbs.list(None) == []
    with pytest.raises(KnowledgeBaseNotFoundError):
        kbs.open("hr-policies", embedder, owner="key-b")
    with pytest.raises(KnowledgeBaseExistsError):
        kbs.create("hr-policies", embedder, embedder.dimension, owner="key-a")
    with pytest.raises(InvalidRequestError, match="bad knowledge-base name"):
        kbs.create("../etc", embedder, embedder.dimension)
    with pytest.raises(KnowledgeBaseNotFoundError, match="no knowledge base named 'nope'"):
        kbs.open("nope", embedder)

    for name, data in [("a.exe", b"MZ\x90\x00"), ("empty.txt", b""), ("bin.txt", b"\x00\x01\x02")]:
        with pytest.raises(DocumentError):
            run(kb.add(data, name))
    assert kb.store.count() == 0 and kb.documents() == []
    with pytest.raises(InvalidRequestError, match="empty"):
        run(kb.query("  "))
    with pytest.raises(InvalidRequestError, match="mode"):
        run(kb.query("x", mode="fuzzy"))
    kbs.delete("hr-policies", owner="key-a")
    assert not kbs.db.exists(kb.manifest.collection)
