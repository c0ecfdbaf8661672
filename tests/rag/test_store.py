"""The vector store on real text (Shakespeare speeches) with deterministic hashed bag-of-words
vectors. The behaviour tests run on both backends (the `db` fixture: Milvus Lite in-process and
SQLite); the Milvus-only ones cover a reopen from another process, the file lock and the same
code against `python -m milvus_lite server` over gRPC. SQLite-only tests: test_sqlite_store.py."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pagoda.errors import PagodaError
from pagoda.rag.milvus_store import ANALYZERS, MilvusDatabase, default_uri, filter_expression
from pagoda.rag.sqlite_store import SqliteDatabase
from pagoda.rag.store import (
    DENSE_WEIGHT,
    ENGLISH_STOP_WORDS,
    FUSION_DEPTH,
    LANGUAGES,
    Chunk,
    ChunkMeta,
    CollectionExistsError,
    CollectionNotFoundError,
    DimensionMismatchError,
    Filter,
    InvalidStoreRequestError,
    StoreUnavailableError,
    relative_score_fusion,
    rrf,
)

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
DIM = 64
N_CHUNKS, N_DOCS = 80, 4
QUOTED_SOURCE = 'plays/it\'s "doc3".txt'  # exercises the quoting of filter literals


def embed(text: str) -> np.ndarray:
    """A hashed bag of words, L2-normalised: texts that share words get similar vectors."""
    vector = np.zeros(DIM, np.float32)
    for word in re.findall(r"[a-z']+", text.lower()):
        vector[int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little") % DIM] += 1
    return vector / max(float(np.linalg.norm(vector)), 1e-9)


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def shakespeare_chunks() -> list[Chunk]:
    """The first speeches of three lines or more, dealt round-robin into N_DOCS documents."""
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is missing (shared/ data beside the checkout)")
    blocks = [b.strip() for b in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n")]
    speeches = [b for b in blocks if b.count("\n") >= 2][:N_CHUNKS]
    chunks = []
    for i, text in enumerate(speeches):
        doc = f"doc{i % N_DOCS}"
        source = QUOTED_SOURCE if doc == "doc3" else f"plays/{doc}.txt"
        meta = ChunkMeta(source=source, page=i % 3 or None,
                         headings=("Coriolanus", f"Speech {i}"), start=100 * i,
                         end=100 * i + len(text))
        chunks.append(Chunk(id=f"{doc}-{i}", doc_id=doc, text=text, vector=embed(text),
                            meta=meta))
    return chunks


def rare_word(chunks: list[Chunk]) -> tuple[str, Chunk]:
    """A long word that occurs in exactly one chunk, and that chunk."""
    owners: dict[str, list[Chunk]] = {}
    for chunk in chunks:
        for word in words(chunk.text):
            owners.setdefault(word, []).append(chunk)
    word = min(w for w, found in owners.items() if len(found) == 1 and len(w) >= 8)
    return word, owners[word][0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BACKENDS = {"milvus": lambda folder: MilvusDatabase(folder / "kb.db"),
            "sqlite": lambda folder: SqliteDatabase(folder / "kb.sqlite")}


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def db(request, tmp_path_factory):
    database = BACKENDS[request.param](tmp_path_factory.mktemp(request.param))
    yield database
    database.close()


@pytest.fixture(scope="module")
def chunks() -> list[Chunk]:
    return shakespeare_chunks()


@pytest.fixture(scope="module")
def plays(db, chunks):
    store = db.create("plays", DIM)
    store.add(chunks)
    return store


def test_relative_score_fusion_scales_each_ranking_then_weights_and_sums():
    fused = relative_score_fusion([[("a", 0.9), ("b", 0.5), ("c", 0.1)],
                                   [("c", 12.0), ("d", 4.0), ("a", 2.0)]], [0.5, 0.5])
    assert dict(fused) == pytest.approx({"a": 0.5 * 1.0 + 0.5 * 0.0, "b": 0.5 * 0.5,
                                         "c": 0.5 * 0.0 + 0.5 * 1.0, "d": 0.5 * 0.2})
    assert [item for item, _ in fused] == ["a", "c", "b", "d"]  # ties: first seen first
    # a BM25 hit far ahead of the rest beats the dense top hit when its dense score is close
    # (RRF would rank them by position alone and tie them)
    fused = relative_score_fusion([[("x", 0.61), ("z", 0.605), ("y", 0.60), ("w", 0.30)],
                                   [("z", 30.0), ("x", 3.0), ("y", 2.0)]], [0.5, 0.5])
    assert fused[0][0] == "z"
    assert relative_score_fusion([[("x", 2.0)]], [1.0]) == [("x", 1.0)]  # one candidate: top
    assert relative_score_fusion([[], []], [0.5, 0.5]) == []


def test_filters_become_quoted_milvus_expressions():
    assert filter_expression(None) == ""
    assert filter_expression(Filter()) == ""
    assert filter_expression(Filter(doc_ids=["a\"b"], sources=["x\\y", "中文"])) == (
        'doc_id in ["a\\"b"] and source in ["x\\\\y", "中文"]')


def test_every_language_has_an_analyzer_and_the_default_lives_in_pagoda_home():
    assert set(ANALYZERS) == set(LANGUAGES)
    assert default_uri() == str(Path(os.environ["PAGODA_HOME"]) / "vectors" / "milvus.db")


def test_chunks_come_back_with_their_metadata(plays, chunks):
    assert plays.count() == len(chunks) == N_CHUNKS
    for chunk in (chunks[0], chunks[3], chunks[7]):
        (hit,) = plays.dense_search(chunk.vector, k=1)
        assert (hit.id, hit.doc_id, hit.text, hit.meta) == (
            chunk.id, chunk.doc_id, chunk.text, chunk.meta)
        assert hit.score == pytest.approx(1.0, abs=1e-4)
    assert chunks[3].meta.page is None and chunks[3].meta.source == QUOTED_SOURCE


def test_keyword_query_is_found_by_bm25(plays, chunks):
    word, owner = rare_word(chunks)
    hits = plays.keyword_search(word, k=5)
    assert [h.id for h in hits] == [owner.id]  # BM25 returns only chunks sharing a term
    assert hits[0].score > 0
    common = plays.keyword_search("good", k=N_CHUNKS)
    assert len(common) == sum("good" in words(c.text) for c in chunks) > 5
    assert all("good" in words(h.text) for h in common)
    assert [h.score for h in common] == sorted((h.score for h in common), reverse=True)
    assert plays.keyword_search("   ") == []


def test_english_stop_words_are_not_indexed(plays, chunks):
    assert plays.keyword_search("the and of it is not to be", k=N_CHUNKS) == []
    # "the" adds nothing: the same chunks in the same order as for "good" alone
    good = [h.id for h in plays.keyword_search("good", k=N_CHUNKS)]
    assert [h.id for h in plays.keyword_search("the good", k=N_CHUNKS)] == good
    assert {"the", "and", "it's", "yourselves"} <= ENGLISH_STOP_WORDS


def test_near_duplicate_vector_is_found_by_dense_search(plays, chunks):
    target = chunks[42]
    noisy = target.vector + 0.05 * np.random.default_rng(0).standard_normal(DIM)
    hits = plays.dense_search(noisy / np.linalg.norm(noisy), k=3)
    assert hits[0].id == target.id
    assert hits[0].score > hits[1].score >= hits[2].score


def test_hybrid_returns_the_keyword_hit_and_the_dense_hit(plays, chunks):
    word, owner = rare_word(chunks)
    other = next(c for c in chunks if word not in words(c.text) and c.id != owner.id)
    hits = plays.hybrid_search(word, other.vector, k=2)
    assert {h.id for h in hits} == {owner.id, other.id}


def test_rrf_sums_reciprocal_ranks():
    fused = rrf([["a", "b", "c"], ["c", "a", "d"]])
    assert [item for item, _ in fused] == ["a", "c", "b", "d"]
    assert dict(fused) == pytest.approx(
        {"a": 1 / 61 + 1 / 62, "c": 1 / 63 + 1 / 61, "b": 1 / 62, "d": 1 / 63})
    assert rrf([["x"]], k=0) == [("x", 1.0)]
    assert rrf([]) == []


def test_hybrid_with_rrf_fuses_by_rank_and_an_unknown_fusion_is_refused(plays, chunks):
    query, vector = "good citizens of Rome", chunks[10].vector
    dense = [h.id for h in plays.dense_search(vector, k=FUSION_DEPTH)]
    keyword = [h.id for h in plays.keyword_search(query, k=FUSION_DEPTH)]
    expected = rrf([dense, keyword])
    hits = plays.hybrid_search(query, vector, k=8, fusion="rrf")
    assert [(h.id, h.score) for h in hits] == [(i, pytest.approx(s)) for i, s in expected[:8]]
    with pytest.raises(InvalidStoreRequestError, match="unknown fusion"):
        plays.hybrid_search(query, vector, k=8, fusion="borda")


def test_hybrid_scores_fuse_the_dense_and_bm25_rankings(plays, chunks):
    query, vector = "good citizens of Rome", chunks[10].vector
    dense = [(h.id, h.score) for h in plays.dense_search(vector, k=FUSION_DEPTH)]
    keyword = [(h.id, h.score) for h in plays.keyword_search(query, k=FUSION_DEPTH)]
    expected = relative_score_fusion([dense, keyword], [DENSE_WEIGHT, 1 - DENSE_WEIGHT])
    hits = plays.hybrid_search(query, vector, k=8)
    assert [h.score for h in hits] == pytest.approx([s for _, s in expected[:8]], rel=1e-5)
    assert all(h.score == pytest.approx(dict(expected)[h.id], rel=1e-5) for h in hits)


def test_filters_by_document_and_source(plays, chunks):
    per_doc = N_CHUNKS // N_DOCS
    assert plays.count(Filter(doc_ids=["doc1"])) == per_doc
    assert plays.count(Filter(doc_ids=["doc0", "doc2"])) == 2 * per_doc
    assert plays.count(Filter(sources=[QUOTED_SOURCE])) == per_doc
    assert plays.count(Filter(doc_ids=["doc0", "doc2"], sources=["plays/doc0.txt"])) == per_doc
    assert plays.count(Filter(doc_ids=["nothing"])) == 0

    vector = chunks[1].vector  # a doc1 chunk: unfiltered it comes first
    hits = plays.dense_search(vector, k=10, where=Filter(doc_ids=["doc2"]))
    assert len(hits) == 10 and {h.doc_id for h in hits} == {"doc2"}
    hits = plays.keyword_search("Rome", k=10, where=Filter(sources=[QUOTED_SOURCE]))
    assert len(hits) == 3 and {h.meta.source for h in hits} == {QUOTED_SOURCE}
    hits = plays.hybrid_search("citizens", vector, k=10, where=Filter(doc_ids=["doc3"]))
    assert len(hits) == 10 and {h.doc_id for h in hits} == {"doc3"}


def test_re_adding_a_chunk_replaces_it_and_deletes_are_by_document_and_idempotent(db, chunks):
    store = db.create("deletions", DIM)
    store.add(chunks[:12])
    replaced = Chunk(id=chunks[0].id, doc_id=chunks[0].doc_id, text="Zounds, a replacement.",
                     vector=embed("Zounds, a replacement."))
    store.add([replaced, chunks[12]])  # one stored id, one new: both land once
    assert store.count() == 13
    assert [h.id for h in store.keyword_search("zounds")] == [replaced.id]
    twice = Chunk(id=chunks[12].id, doc_id=chunks[12].doc_id, text="Gadzooks, twice.",
                  vector=embed("Gadzooks, twice."))
    store.add([chunks[12], twice])  # the same id twice in one call: the last one is kept
    assert store.count() == 13
    assert [h.id for h in store.keyword_search("gadzooks")] == [twice.id]
    assert store.keyword_search("zounds")[0].text == "Zounds, a replacement."

    store.delete_document("doc0")
    assert store.count() == 9 and store.count(Filter(doc_ids=["doc0"])) == 0
    assert store.keyword_search("zounds") == []
    assert all(h.doc_id != "doc0" for h in store.dense_search(chunks[4].vector, k=12))
    store.delete_document("doc0")
    store.delete_document("never-added")
    assert store.count() == 9

    db.drop("deletions")
    db.drop("deletions")
    assert not db.exists("deletions") and "deletions" not in db.names()


def test_chinese_collection_uses_the_jieba_analyzer(db):
    texts = ["知识库助手从上传的文档中检索相关段落，并引用来源回答问题。",
             "向量数据库存储文本的嵌入向量，支持相似度搜索。",
             "今天的天气很好，我们去公园散步吧。",
             "大语言模型可能产生幻觉，检索增强生成可以缓解这个问题。"]
    vectors = np.random.default_rng(1).standard_normal((len(texts), DIM))
    store = db.create("zh_docs", DIM, language="zh")
    store.add([Chunk(id=f"zh{i}", doc_id="zh", text=t, vector=v)
               for i, (t, v) in enumerate(zip(texts, vectors, strict=True))])
    assert store.keyword_search("数据库", k=2)[0].id == "zh1"
    assert store.keyword_search("幻觉", k=2)[0].id == "zh3"
    assert store.keyword_search("公园的天气", k=2)[0].id == "zh2"
    assert {h.id for h in store.hybrid_search("幻觉", vectors[0], k=2)} == {"zh0", "zh3"}


def test_errors_are_pagoda_errors_on_one_line(db, plays):
    cases = [
        (CollectionNotFoundError, lambda: db.open("missing_kb")),
        (CollectionExistsError, lambda: db.create("plays", DIM)),
        (InvalidStoreRequestError, lambda: db.create("hr-policies", DIM)),
        (InvalidStoreRequestError, lambda: db.create("fr_docs", DIM, language="fr")),
        (DimensionMismatchError, lambda: db.open("plays", dim=DIM + 1)),
        (DimensionMismatchError, lambda: plays.add(
            [Chunk(id="bad", doc_id="bad", text="x", vector=np.ones(DIM + 1))])),
        (DimensionMismatchError, lambda: plays.dense_search([1.0, 0.0, 0.0])),
        (DimensionMismatchError, lambda: plays.hybrid_search("citizens", [1.0, 0.0])),
        (InvalidStoreRequestError, lambda: plays.add(
            [Chunk(id="big", doc_id="big", text="x" * 70_000, vector=np.ones(DIM))])),
    ]
    for error, call in cases:
        with pytest.raises(error) as info:
            call()
        assert isinstance(info.value, PagodaError) and "\n" not in str(info.value)
    assert db.open("plays", dim=DIM).count() == N_CHUNKS  # nothing half-added
    with pytest.raises(CollectionNotFoundError, match="missing_kb"):
        db.open("missing_kb")


def test_a_milvus_lite_path_must_end_in_db(tmp_path):
    with pytest.raises(InvalidStoreRequestError, match="neither a server"):
        MilvusDatabase(tmp_path / "folder")


def test_an_unreachable_server_is_one_readable_line():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        MilvusDatabase(uri, timeout=2)
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert uri in message and "\n" not in message
    assert info.value.http_status == 503


def test_a_collection_persists_on_disk_and_is_locked_while_another_process_has_it(tmp_path):
    path = tmp_path / "persist.db"
    writer = """
import sys
from pagoda.rag.milvus_store import MilvusDatabase
from pagoda.rag.store import Chunk
db = MilvusDatabase(sys.argv[1])
db.create("kept", 3).add([
    Chunk(id="c1", doc_id="d1", text="The quality of mercy is not strained", vector=[1, 0, 0]),
    Chunk(id="c2", doc_id="d2", text="Now is the winter of our discontent", vector=[0, 1, 0]),
])
print("written", flush=True)
sys.stdin.read()  # hold the database open until the test closes our stdin
db.close()
"""
    proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "written"
        with pytest.raises(StoreUnavailableError, match="one process") as info:
            MilvusDatabase(path)
        assert "\n" not in str(info.value)
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0

    db = MilvusDatabase(path)
    try:
        store = db.open("kept", dim=3)
        assert store.count() == 2
        assert [h.id for h in store.keyword_search("mercy")] == ["c1"]
        assert store.dense_search([0, 1, 0], k=1)[0].id == "c2"
    finally:
        db.close()


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    """`python -m milvus_lite server` on a free port, stopped (SIGINT: clean close) afterwards."""
    port = free_port()
    data = tmp_path_factory.mktemp("milvus-server") / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"milvus_lite server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("milvus_lite server did not listen within 60 s")
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_the_same_code_runs_against_a_milvus_server(milvus_server, chunks):
    db = MilvusDatabase(milvus_server)
    store = db.create("served", DIM)
    store.add(chunks[:20])
    word, owner = rare_word(chunks[:20])
    assert store.count() == 20
    assert [h.id for h in store.keyword_search(word)] == [owner.id]
    assert store.dense_search(chunks[5].vector, k=1)[0].id == chunks[5].id
    other = chunks[5] if owner.id != chunks[5].id else chunks[6]
    assert {h.id for h in store.hybrid_search(word, other.vector, k=2)} == {owner.id, other.id}
    store.delete_document("doc1")
    assert store.count(Filter(doc_ids=["doc1"])) == 0
    db.close()

    again = MilvusDatabase(milvus_server)
    try:
        assert "served" in again.names()
        assert again.open("served", dim=DIM).count() == 15
    finally:
        again.close()
