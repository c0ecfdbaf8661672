"""What only the SQLite backend does: one file shared by connections and processes (each sees the
others' writes; cached vectors follow), all-or-nothing writes, its analyzers (jieba words whole,
English stop words never indexed, the same hits as Milvus), one-line errors for files it cannot
use, and `open_database` choosing a backend by URI. The behaviour both backends share is tested
on both in test_store.py."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from milvus_lite.analyzer.factory import create_analyzer

from pagoda.rag.databases import open_database, sqlite_path
from pagoda.rag.milvus_store import ANALYZERS, MilvusDatabase
from pagoda.rag.sqlite_store import MAX_QUERY_TERMS, SqliteDatabase, _rarest, analyze
from pagoda.rag.store import (
    ENGLISH_STOP_WORDS,
    Chunk,
    ChunkMeta,
    CollectionNotFoundError,
    Filter,
    StoreError,
    StoreUnavailableError,
)

REPO = Path(__file__).resolve().parents[2]
LINES = {  # id: (text, vector)
    "mercy": ("The quality of mercy is not strained", [1, 0, 0]),
    "winter": ("Now is the winter of our discontent", [0, 1, 0]),
    "rose": ("A rose by any other name would smell as sweet", [0, 0, 1]),
}


def chunk(id_: str, doc_id: str | None = None, **meta) -> Chunk:
    text, vector = LINES[id_]
    return Chunk(id=id_, doc_id=doc_id or id_, text=text, vector=vector, meta=ChunkMeta(**meta))


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "kb.sqlite"


@pytest.fixture
def db(path):
    database = SqliteDatabase(path)
    yield database
    database.close()


def ids(hits) -> list[str]:
    return [h.id for h in hits]


def test_two_connections_see_each_others_writes(db, path):
    store = db.create("shared", 3)
    store.add([chunk("mercy")])
    assert ids(store.dense_search([0, 1, 0], k=3)) == ["mercy"]  # vectors now cached

    other = SqliteDatabase(path)
    try:
        theirs = other.open("shared", dim=3)
        theirs.add([chunk("winter"), chunk("rose")])
        assert ids(store.dense_search([0, 1, 0], k=1)) == ["winter"]
        theirs.delete_document("winter")
        assert ids(store.dense_search([0, 1, 0], k=3)) == ["mercy", "rose"]
        assert ids(store.keyword_search("winter discontent")) == []
        store.add([chunk("winter")])  # our own write patches our cache; theirs reloads
        assert ids(theirs.dense_search([0, 1, 0], k=1)) == ["winter"]
        assert store.count() == theirs.count() == 3

        other.drop("shared")
        with pytest.raises(CollectionNotFoundError, match="no longer exists"):
            store.dense_search([1, 0, 0])
        other.create("shared", 3).add([chunk("rose")])
        assert ids(store.dense_search([1, 0, 0], k=3)) == ["rose"]  # not the dropped vectors
    finally:
        other.close()


def test_another_process_writes_while_this_one_holds_the_file(db, path):
    store = db.create("kept", 3)
    store.add([chunk("mercy")])
    store.dense_search([1, 0, 0])
    writer = """
import sys
from pagoda.rag.sqlite_store import SqliteDatabase
from pagoda.rag.store import Chunk
db = SqliteDatabase(sys.argv[1])
store = db.open("kept", dim=3)
store.add([Chunk(id="c2", doc_id="d2", text="Now is the winter of our discontent",
                 vector=[0, 1, 0])])
store.delete_document("mercy")
db.close()
"""
    subprocess.run([sys.executable, "-c", writer, str(path)], cwd=REPO, check=True, timeout=60)
    assert ids(store.dense_search([1, 0, 0], k=5)) == ["c2"]
    assert ids(store.keyword_search("winter")) == ["c2"]


def test_a_failure_inside_an_add_leaves_the_collection_as_it_was(db):
    store = db.create("atomic", 3)
    store.add([chunk("mercy"), chunk("winter")])
    before = [(h.id, h.text, h.score) for h in store.dense_search([1, 0, 0], k=5)]
    replaced = Chunk(id="mercy", doc_id="mercy", text="Zounds", vector=[0, 0, 1])
    bad = chunk("rose", page=["not", "a", "page"])  # SQLite cannot bind it: fails mid-batch
    with pytest.raises(StoreError, match="SQLite could not add chunks") as info:
        store.add([replaced, chunk("winter", doc_id="moved"), bad])
    assert "\n" not in str(info.value)
    assert store.count() == 2 and store.count(Filter(doc_ids=["moved"])) == 0
    assert store.keyword_search("zounds") == [] and ids(store.keyword_search("mercy")) == ["mercy"]
    assert [(h.id, h.text, h.score) for h in store.dense_search([1, 0, 0], k=5)] == before


def test_the_analyzers_match_milvus():
    """The same terms as Milvus Lite's analyzers (from the same ANALYZERS parameters), except
    that punctuation is no term (Milvus' cnalphanumonly filter, which Milvus Lite skips)."""
    english = "The Winter's tale: it_was 3 o'clock! Café"
    assert analyze(english, "en") == ["winter", "tale", "it_was", "3", "clock", "café"]
    assert analyze(english, "en") == create_analyzer(ANALYZERS["en"]).tokenize(english)
    assert analyze(" ".join(sorted(ENGLISH_STOP_WORDS)), "en") == []
    chinese = "向量数据库存储文本的嵌入向量，支持相似度搜索。"
    terms = analyze(chinese, "zh")
    assert {"向量", "数据", "数据库", "搜索"} <= set(terms)
    assert terms == [t for t in create_analyzer(ANALYZERS["zh"]).tokenize(chinese)
                     if t not in "，。"]


def test_chinese_words_are_indexed_whole(db):
    store = db.create("zh_words", 3, language="zh")
    store.add([Chunk(id="db", doc_id="d", text="向量数据库支持相似度搜索。", vector=[1, 0, 0]),
               Chunk(id="data", doc_id="d", text="数据分析需要清洗数据。", vector=[0, 1, 0])])
    assert ids(store.keyword_search("数据库", k=2)) == ["db", "data"]  # 数据库, then 数据
    assert ids(store.keyword_search("库", k=2)) == []  # no match inside a word
    assert ids(store.keyword_search("分析", k=2)) == ["data"]


def test_stop_words_are_not_indexed_and_both_backends_find_the_same(db, path, tmp_path):
    texts = {f"line{i}": text for i, (text, _) in enumerate(LINES.values())} | {
        "line3": "Mercy is the theme of the trial scene, and mercy wins",
        "line4": "Is this a dagger which I see before me",
    }
    rng = np.random.default_rng(0)
    chunks = [Chunk(id=i, doc_id=i, text=t, vector=rng.standard_normal(3))
              for i, t in texts.items()]
    store = db.create("stops", 3)
    store.add(chunks)
    with sqlite3.connect(path) as raw:
        indexed = " ".join(t for (t,) in raw.execute("select terms from fts_1")).split()
    assert indexed and not set(indexed) & ENGLISH_STOP_WORDS

    milvus = MilvusDatabase(tmp_path / "milvus.db")
    try:
        twin = milvus.create("stops", 3)
        twin.add(chunks)
        for query in ["the of is", "the mercy", "mercy of the dagger", "a rose is a rose"]:
            assert ids(store.keyword_search(query, k=5)) == ids(twin.keyword_search(query, k=5))
        assert store.keyword_search("is this a") == []
    finally:
        milvus.close()


def test_files_it_cannot_use_are_one_line_errors(path, tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all " * 100)
    for target in (junk, tmp_path):  # not SQLite; a folder
        with pytest.raises(StoreUnavailableError, match="cannot open the SQLite") as info:
            SqliteDatabase(target)
        assert "\n" not in str(info.value) and info.value.http_status == 503

    db = SqliteDatabase(path, timeout=0.2)
    store = db.create("busy", 3)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("begin immediate")  # another process in the middle of a long write
        assert store.count() == 0  # readers never wait (WAL)
        with pytest.raises(StoreUnavailableError, match="locked") as info:
            store.add([chunk("mercy")])
        assert "\n" not in str(info.value)
    finally:
        holder.close()
        db.close()


def test_open_database_chooses_the_backend_by_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert sqlite_path(f"sqlite://{tmp_path}/a.sqlite") == f"{tmp_path}/a.sqlite"
    assert sqlite_path("sqlite:rel/b.sqlite") == "rel/b.sqlite"
    assert sqlite_path("sqlite:") == str(tmp_path / "home" / "vectors" / "kb.sqlite")
    assert sqlite_path("c.sqlite3") == "c.sqlite3"
    assert sqlite_path("milvus.db") is None and sqlite_path("http://milvus:19530") is None

    for uri, made in [(f"sqlite://{tmp_path}/a.sqlite", tmp_path / "a.sqlite"),
                      ("sqlite:rel/b.sqlite", tmp_path / "rel" / "b.sqlite"),
                      ("c.sqlite3", tmp_path / "c.sqlite3"),
                      ("sqlite:", tmp_path / "home" / "vectors" / "kb.sqlite")]:
        db = open_database(uri)
        assert isinstance(db, SqliteDatabase) and made.is_file()
        db.close()
    for uri in (str(tmp_path / "lite.db"), None):
        db = open_database(uri)
        assert isinstance(db, MilvusDatabase)
        db.close()
    assert (tmp_path / "home" / "vectors" / "milvus.db").exists()


def test_a_long_keyword_query_keeps_its_rarest_terms(db):
    common = [f"common{i}" for i in range(MAX_QUERY_TERMS)]
    rare = ["zephyr", "quokka"]
    chunks = [Chunk(f"c{i}", f"d{i}", " ".join(common), np.eye(4, dtype=np.float32)[0])
              for i in range(20)]
    chunks.append(Chunk("target", "dt", " ".join(rare + common[:2]),
                        np.eye(4, dtype=np.float32)[1]))
    store = db.create("long", 4)
    store.add(chunks)
    query = " ".join(common + rare)  # more terms than the cap: the common ones go first
    assert ids(store.keyword_search(query, k=1)) == ["target"]
    with db.transaction("test") as cur:
        fts = f"fts_{store._key(cur)[0]}"
        kept = _rarest(cur, fts, common + rare, MAX_QUERY_TERMS)
    assert len(kept) == MAX_QUERY_TERMS and set(rare) <= set(kept)
    assert kept == [t for t in common + rare if t in kept]  # query order kept
