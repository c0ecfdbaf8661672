"""The Milvus Lite fast path returns exactly what Milvus Lite's own search returns: BM25 index
and scoring against the stock code on random term frequencies, and whole collections (several
segments, upserts, deletes, filters) queried both ways. Ids, order and float32 scores must be
bit-identical, ties included."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from milvus_lite.index.sparse_inverted import SparseInvertedIndex

from pagoda.rag import milvus_lite_fastpath as fastpath
from pagoda.rag.milvus_store import MilvusDatabase
from pagoda.rag.store import Chunk, ChunkMeta, Filter

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
DIM = 16


def random_term_frequencies(rng: np.random.Generator, n: int) -> list[dict[int, float]]:
    """Documents as {term: count}, with empty and duplicated documents (ties)."""
    docs = []
    for i in range(n):
        if i % 17 == 0:
            docs.append({})
        elif i % 5 == 0 and docs:
            docs.append(dict(docs[-1]))
        else:
            terms = rng.choice(60, size=rng.integers(1, 12), replace=False) * 7919 + 3
            docs.append({int(t): float(rng.integers(1, 4)) for t in terms})
    return docs


def stock_index(docs, mask=None) -> SparseInvertedIndex:
    fastpath.uninstall()
    try:
        index = SparseInvertedIndex(k1=1.2, b=0.7)
        index.build(docs, valid_mask=mask)
        return index
    finally:
        fastpath.install()


def test_bm25_index_and_scores_equal_milvus_lite_bit_for_bit():
    rng = np.random.default_rng(0)
    docs = random_term_frequencies(rng, 300)
    queries = [{int(t) * 7919 + 3: 1.0 for t in rng.choice(60, size=rng.integers(1, 5))}
               for _ in range(40)] + [{}, {999_999_999: 1.0}, {3: 2.0, 7922: 1.0}]
    build_mask = rng.random(300) > 0.1
    search_mask = rng.random(300) > 0.3
    theirs = stock_index(docs, build_mask)
    ours = SparseInvertedIndex(k1=1.2, b=0.7)
    fastpath._bm25_build(ours, docs, valid_mask=build_mask)
    assert (ours.doc_count, ours.avgdl) == (theirs.doc_count, theirs.avgdl)
    np.testing.assert_array_equal(ours._doc_lengths, theirs._doc_lengths)
    for mask in (None, search_mask):
        for k in (1, 10, 400):
            want = fastpath._installed["bm25_search"](theirs, queries, k, valid_mask=mask)
            for index in (ours, theirs):  # ours, and Milvus Lite's index read by the fast path
                got = fastpath._bm25_search(index, queries, k, valid_mask=mask)
                np.testing.assert_array_equal(got[0], want[0])
                np.testing.assert_array_equal(got[1], want[1])
    fastpath.uninstall()  # our index, handed back to Milvus Lite's own search
    try:
        for mask in (None, search_mask):
            got = ours.search(queries, 10, valid_mask=mask)
            want = theirs.search(queries, 10, valid_mask=mask)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
    finally:
        fastpath.install()


def test_bm25_refuses_a_mask_of_the_wrong_shape():
    index = SparseInvertedIndex()
    fastpath._bm25_build(index, [{1: 1.0}, {2: 1.0}])
    with pytest.raises(ValueError, match="valid_mask"):
        index.search([{1: 1.0}], 1, valid_mask=np.ones(3, dtype=bool))


def test_live_rows_are_the_newest_undeleted_versions_and_are_reused_until_a_write():
    old = SimpleNamespace(pks=["a", "b", "c", "d"], seqs=np.array([1, 2, 3, 4]))
    new = SimpleNamespace(pks=["b", "e"], seqs=np.array([6, 7]))
    masks = fastpath.live_masks([old, new], {"c": 5, "e": 6})  # e was deleted before its insert
    assert [m.tolist() for m in masks] == [[True, False, False, True], [True, True]]
    assert fastpath.live_masks([old, new], {"c": 5, "e": 6}) is masks
    after_delete = fastpath.live_masks([old, new], {"c": 5, "e": 6, "a": 8})
    assert after_delete is not masks and after_delete[0].tolist() == [False, False, False, True]
    retired = weakref.ref(old.seqs)
    del old, new
    gc.collect()
    assert retired() is None  # the cache does not keep compacted-away segments alive


def speeches(n: int) -> list[str]:
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is missing (shared/ data beside the checkout)")
    blocks = [b.strip() for b in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n")]
    return [b for b in blocks if b.count("\n") >= 1][:n]


def chunk(i: int, text: str, rng: np.random.Generator) -> Chunk:
    doc = f"doc{i % 6}"
    return Chunk(id=f"c{i}", doc_id=doc, text=text, vector=rng.standard_normal(DIM),
                 meta=ChunkMeta(source=f"plays/{doc}.txt", start=i, end=i + len(text)))


def build_history(store, texts: list[str]) -> None:
    """Four flushed batches (segments) with duplicated texts, an upsert of rows written by an
    earlier batch (superseded rows in old segments), and a deleted document (tombstones)."""
    rng = np.random.default_rng(1)
    rows = [chunk(i, texts[i % 150], rng) for i in range(240)]  # 90 duplicated texts: ties
    for start in range(0, 240, 60):
        store.add(rows[start:start + 60])
    store.add([chunk(i, texts[(i * 7) % 150] + " upserted", rng) for i in range(0, 120, 3)])
    store.delete_document("doc5")


QUESTIONS = ["the king is dead", "my lord", "Rome and the people", "speak, speak",
             "a word that is nowhere xyzzy", "upserted blood"]


def answers(store) -> list:
    rng = np.random.default_rng(2)
    out = []
    for question in QUESTIONS:
        vector = rng.standard_normal(DIM)
        for where in (None, Filter(doc_ids=["doc1", "doc2"]), Filter(sources=["plays/doc0.txt"])):
            for hits in (store.keyword_search(question, 12, where),
                         store.dense_search(vector, 12, where),
                         store.hybrid_search(question, vector, 12, where)):
                out.append([(h.id, h.score, h.doc_id, h.text, h.meta) for h in hits])
    return out


def test_a_collection_answers_the_same_with_and_without_the_fast_path(tmp_path):
    texts = speeches(150)
    db = MilvusDatabase(tmp_path / "kb.db")  # installs the fast path
    try:
        first, second = db.create("first", DIM), db.create("second", DIM)
        build_history(first, texts)
        build_history(second, texts)
        fastpath.uninstall()
        want = answers(first)  # Milvus Lite's own search and BM25 indexes
        assert sum(map(len, want)) > 400
        fastpath.install()
        assert answers(first) == want  # the fast path reading Milvus Lite's indexes
        assert answers(second) == want  # the fast path with its own indexes
    finally:
        fastpath.install()
        db.close()


def test_writes_invalidate_the_live_rows(tmp_path):
    texts = speeches(40)
    rng = np.random.default_rng(3)
    db = MilvusDatabase(tmp_path / "kb.db")
    try:
        store = db.create("kb", DIM)
        store.add([chunk(i, texts[i], rng) for i in range(40)])
        assert "doc1" in {h.doc_id for h in store.keyword_search(texts[1], 40)}
        store.delete_document("doc1")
        assert "doc1" not in {h.doc_id for h in store.keyword_search(texts[1], 40)}
        assert "doc1" not in {h.doc_id for h in store.dense_search(rng.standard_normal(DIM), 40)}
        store.add([Chunk("c0", "doc0", "zebra crossing", rng.standard_normal(DIM),
                         ChunkMeta(source="new.txt"))])
        hits = store.keyword_search("zebra", 5)
        assert [(h.id, h.meta.source) for h in hits] == [("c0", "new.txt")]
        assert store.count() == 40 - len([i for i in range(40) if i % 6 == 1])
    finally:
        db.close()


def test_rows_still_in_the_memtable_go_to_milvus_lites_own_search(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    db = MilvusDatabase(tmp_path / "kb.db")
    try:
        store = db.create("kb", DIM)
        store.add([chunk(i, text, rng) for i, text in enumerate(speeches(20))])
        calls = []
        own = dict(fastpath._installed)
        monkeypatch.setitem(fastpath._installed, "sparse",
                            lambda *a, **k: calls.append("sparse") or own["sparse"](*a, **k))
        monkeypatch.setitem(fastpath._installed, "dense",
                            lambda *a, **k: calls.append("dense") or own["dense"](*a, **k))
        store.keyword_search("lord", 3)
        store.dense_search(rng.standard_normal(DIM), 3)
        assert calls == []
        unflushed = Chunk("late", "doc9", "an unflushed lord", rng.standard_normal(DIM),
                          ChunkMeta(source="late.txt"))
        store._call("upsert", data=[store._row(unflushed)])  # no flush: stays in the memtable
        assert "late" in {h.id for h in store.keyword_search("unflushed lord", 3)}
        assert "late" in {h.id for h in store.dense_search(unflushed.vector, 3)}
        assert calls == ["sparse", "dense"]
    finally:
        db.close()


def test_only_the_supported_milvus_lite_gets_the_fast_path(monkeypatch):
    assert fastpath.enabled()
    monkeypatch.setenv("PAGODA_MILVUS_LITE_FASTPATH", "0")
    assert not fastpath.enabled()
    monkeypatch.delenv("PAGODA_MILVUS_LITE_FASTPATH")
    monkeypatch.setattr(fastpath.metadata, "version", lambda name: "3.3.0")
    assert not fastpath.enabled()
