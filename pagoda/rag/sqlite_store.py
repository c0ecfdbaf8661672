"""A vector store in one SQLite file: FTS5 ranks keywords by BM25, numpy ranks vectors by cosine.

Why a second backend: Milvus Lite is pure Python, so its BM25 walks posting lists in Python and
slows down with the corpus; here keyword search is SQLite's C FTS5 and dense search is one
matrix-vector product over every vector of the collection, held in memory as float32.

Layout: a `collections` table (name, dim, language, a version bumped by every write) and per
collection `chunks_<id>` (an INTEGER PRIMARY KEY `seq`, the chunk id UNIQUE, metadata, the
vector as a float32 BLOB) and `fts_<id>`, an FTS5 table of the chunk's analyzed terms under the
same rowid (tables go by id: SQLite's table names ignore case, collection names do not). The
terms are what Milvus' analyzer of the language makes of the text (see `analyze`), stored
space-joined, so both backends index the same words and rank alike. Every `add` and
`delete_document` is one transaction: all of it or nothing.

Unlike Milvus Lite, several processes may open the same file at once: it runs in WAL mode
(readers never wait), writers take turns under a busy timeout, and a database that stays
locked past it raises StoreUnavailableError. Each search runs in one read snapshot and first
reads its collection's (id, version): the cached matrix is reloaded when another connection or
process wrote since (or dropped and recreated the collection), and patched after this
connection's own writes. A per-collection version rather than `PRAGMA data_version`: the latter
moves on any write to the file, which would reload every collection's vectors on each change.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pagoda.rag import store  # the errors and checks every backend shares
from pagoda.rag.store import (
    COLLECTION_NAME,
    ENGLISH_STOP_WORDS,
    Chunk,
    ChunkMeta,
    Filter,
    Hit,
)

# A keyword query keeps its MAX_QUERY_TERMS rarest terms. FTS5 scores every chunk that holds any
# query term, so the commonest terms of a long question (the lowest IDF, the least weight in
# BM25) cost most of the time: at 100k chunks, capping a sentence-long query at 10 terms halves
# the p95 (Lucene's MoreLikeThis keeps the top max_query_terms by the same reasoning).
MAX_QUERY_TERMS = 10
BUSY_TIMEOUT_S = 30.0  # how long a write waits for another process's write before giving up
# unicode61 keeps letters and digits of every script together (a CJK word stays one token) and
# splits on the rest; `_` is a word character for `\w` too. No diacritic folding: Milvus has none.
_TOKENIZER = "unicode61 remove_diacritics 0 tokenchars _"
_WORD = re.compile(r"\w+")  # Milvus Lite's standard tokenizer
_LETTER_OR_DIGIT = re.compile(r"[^\W_]")  # of any script, CJK included
_FIELDS = "id, doc_id, text, source, page, headings, char_start, char_end, vector"
_COLUMNS = "seq, " + _FIELDS
_SCHEMA = """
create table if not exists collections (
    id integer primary key autoincrement, name text unique not null, dim integer not null,
    language text not null, version integer not null default 0)
"""
# What a write changed, for the cached vectors: removed seqs, added (seq, doc_id, source, vector).
_Added = tuple[int, str, str, bytes]
_Change = tuple[list[int], list[_Added]]


@functools.cache
def _jieba():
    """jieba, imported on first use (its dictionary takes about a second): only for zh."""
    import jieba

    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict..." lines in CLI output
    return jieba


def analyze(text: str, language: str) -> list[str]:
    """The terms Milvus' analyzer for `language` makes of `text` (milvus_store.ANALYZERS):
    English lowercased `\\w+` words minus the stop words; Chinese jieba's search-mode words
    that hold a letter or digit (punctuation dropped, as Milvus' cnalphanumonly filter does)."""
    if language == "zh":
        words = (w.strip().lower() for w in _jieba().lcut_for_search(text))
        return [w for w in words if _LETTER_OR_DIGIT.search(w)]
    return [w for w in _WORD.findall(text.lower()) if w not in ENGLISH_STOP_WORDS]


def _match(terms: Sequence[str]) -> str:
    """An FTS5 query matching any of the terms, each a quoted string (no FTS5 syntax inside)."""
    return " OR ".join('"' + term.replace('"', '""') + '"' for term in dict.fromkeys(terms))


def _rarest(cur: sqlite3.Cursor, fts: str, terms: list[str], n: int) -> list[str]:
    """The n terms in the fewest chunks (FTS5's vocabulary table counts them), query order kept."""
    vocab = f"temp.vocab_{fts}"
    cur.execute(f"create virtual table if not exists {vocab} using fts5vocab(main, {fts}, 'row')")
    holes = ", ".join("?" * len(terms))
    counts = dict(cur.execute(f"select term, doc from {vocab} where term in ({holes})", terms))
    keep = set(sorted(terms, key=lambda term: counts.get(term, 0))[:n])
    return [term for term in terms if term in keep]


def _filter_sql(where: Filter | None) -> tuple[str, list[str]]:
    """` and ...` conditions on the chunks table `c` for a filter, and their parameters."""
    sql, params = "", []
    if where is None:
        return sql, params
    for column, values in (("doc_id", where.doc_ids), ("source", where.sources)):
        if values is not None:
            sql += f" and c.{column} in ({','.join('?' * len(values))})"
            params += values
    return sql, params


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), so a dot product is a cosine."""
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / np.maximum(norms, np.float32(1e-12))


def _hit(row: tuple, score: float) -> Hit:
    _, id_, doc_id, text, source, page, headings, start, end, vector = row
    return Hit(id=id_, doc_id=doc_id, text=text, score=score,
               meta=ChunkMeta(source=source, page=page, headings=tuple(json.loads(headings)),
                              start=start, end=end),
               vector=np.frombuffer(vector, dtype=np.float32).copy())


@dataclass(frozen=True)
class _Vectors:
    """One collection's vectors as a matrix of unit rows, with what filters and hits need."""

    key: tuple[int, int]  # (collection id, version) of the snapshot it reflects
    seqs: np.ndarray  # int64, the chunk row of each matrix row
    matrix: np.ndarray  # float32 (n, dim)
    doc_ids: np.ndarray  # object
    sources: np.ndarray  # object

    @classmethod
    def read(cls, cur: sqlite3.Cursor, key: tuple[int, int], dim: int) -> _Vectors:
        rows = cur.execute(f"select seq, doc_id, source, vector from chunks_{key[0]}").fetchall()
        return cls.of(key, rows, dim)

    @classmethod
    def of(cls, key: tuple[int, int], rows: Sequence[_Added], dim: int) -> _Vectors:
        matrix = np.frombuffer(b"".join(r[3] for r in rows), dtype=np.float32).reshape(-1, dim)
        return cls(key, np.array([r[0] for r in rows], dtype=np.int64), _unit_rows(matrix),
                   np.array([r[1] for r in rows], dtype=object),
                   np.array([r[2] for r in rows], dtype=object))

    def patched(self, key: tuple[int, int], change: _Change) -> _Vectors:
        """These vectors after a write that removed and added rows."""
        removed, added = change
        if not removed and not added:
            return replace(self, key=key)
        keep = ~np.isin(self.seqs, np.asarray(removed, dtype=np.int64))
        new = _Vectors.of(key, added, self.matrix.shape[1])
        return _Vectors(key, *(np.concatenate([old[keep], more]) for old, more in (
            (self.seqs, new.seqs), (self.matrix, new.matrix), (self.doc_ids, new.doc_ids),
            (self.sources, new.sources))))

    def mask(self, where: Filter) -> np.ndarray:
        """Which rows pass the filter."""
        keep = np.ones(len(self.seqs), dtype=bool)
        if where.doc_ids is not None:
            keep &= np.isin(self.doc_ids, list(where.doc_ids))
        if where.sources is not None:
            keep &= np.isin(self.sources, list(where.sources))
        return keep


class SqliteStore:
    """One collection of chunks in a SQLite file; see `pagoda.rag.store.VectorStore`."""

    def __init__(self, db: SqliteDatabase, name: str, dim: int, language: str):
        self._db = db
        self.name = name
        self.dim = dim
        self.language = language

    def _key(self, cur: sqlite3.Cursor) -> tuple[int, int]:
        """(id, version) of this collection in the current transaction's snapshot."""
        row = cur.execute("select id, version from collections where name = ?",
                          (self.name,)).fetchone()
        if row is None:
            raise store.CollectionNotFoundError(f"vector collection {self.name!r} no longer exists")
        return row

    def _hits(self, cur: sqlite3.Cursor, cid: int,
              ranked: Sequence[tuple[int, float]]) -> list[Hit]:
        """Hits for (seq, score) pairs, in their order."""
        seqs = [seq for seq, _ in ranked]
        rows = {row[0]: row for row in cur.execute(
            f"select {_COLUMNS} from chunks_{cid} where seq in ({','.join('?' * len(seqs))})",
            seqs)}
        return [_hit(rows[seq], score) for seq, score in ranked]

    def _remove(self, cur: sqlite3.Cursor, cid: int, column: str, value: str) -> list[int]:
        """Delete the chunks whose `column` is `value`; their seqs."""
        seqs = [seq for (seq,) in cur.execute(
            f"select seq from chunks_{cid} where {column} = ?", (value,))]
        cur.executemany(f"delete from fts_{cid} where rowid = ?", [(seq,) for seq in seqs])
        cur.executemany(f"delete from chunks_{cid} where seq = ?", [(seq,) for seq in seqs])
        return seqs

    def _write(self, what: str, work: Callable[[sqlite3.Cursor, int], _Change]) -> None:
        """Run `work(cur, collection id)` in one write transaction, bump the collection's
        version and bring the cached vectors along."""
        with self._db.transaction(f"{what} in {self.name!r}", write=True) as cur:
            cid, version = self._key(cur)
            change = work(cur, cid)
            cur.execute("update collections set version = ? where id = ?", (version + 1, cid))
        self._db.patch(self.name, (cid, version), (cid, version + 1), change)

    def add(self, chunks: Sequence[Chunk]) -> None:
        """Insert chunks; a chunk whose id is already stored replaces it."""
        if not chunks:
            return
        latest = {c.id: c for c in chunks}  # a repeated id: the last one wins, as in an upsert
        for chunk in latest.values():
            store.check_text(chunk)
        # Vectors and terms first: analysis (jieba) must not hold the write lock.
        prepared = [(c, store.as_vector(c.vector, self.name, self.dim).tobytes(),
                     " ".join(analyze(c.text, self.language))) for c in latest.values()]

        def work(cur: sqlite3.Cursor, cid: int) -> _Change:
            removed: list[int] = []
            added: list[_Added] = []
            for chunk, vector, terms in prepared:
                removed += self._remove(cur, cid, "id", chunk.id)
                meta = chunk.meta
                cur.execute(
                    f"insert into chunks_{cid} ({_FIELDS}) values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (chunk.id, chunk.doc_id, chunk.text, meta.source, meta.page,
                     json.dumps(list(meta.headings), ensure_ascii=False), meta.start, meta.end,
                     vector))
                seq = cur.lastrowid
                cur.execute(f"insert into fts_{cid} (rowid, terms) values (?, ?)", (seq, terms))
                added.append((seq, chunk.doc_id, meta.source, vector))
            return removed, added

        self._write("add chunks", work)

    def delete_document(self, doc_id: str) -> None:
        """Remove every chunk of a document; deleting an absent document does nothing."""
        self._write("delete a document",
                    lambda cur, cid: (self._remove(cur, cid, "doc_id", doc_id), []))

    def count(self, where: Filter | None = None) -> int:
        """How many chunks are stored (that pass the filter)."""
        sql, params = _filter_sql(where)
        with self._db.transaction(f"count {self.name!r}") as cur:
            cid, _ = self._key(cur)
            return cur.execute(f"select count(*) from chunks_{cid} c where 1{sql}",
                               params).fetchone()[0]

    def dense_search(self, vector: Sequence[float], k: int = 5,
                     where: Filter | None = None) -> list[Hit]:
        """The k chunks whose vectors are most cosine-similar to `vector`."""
        query = _unit_rows(store.as_vector(vector, self.name, self.dim))
        with self._db.transaction(f"search {self.name!r}") as cur:
            key = self._key(cur)
            cached = self._db.vectors(cur, self.name, key, self.dim)
            # torch, not numpy: numpy's OpenBLAS threads keep spinning after a product and
            # slow the embedder's next forward pass several-fold on a small machine.
            scores = (torch.from_numpy(cached.matrix) @ torch.from_numpy(query)).numpy()
            rows = np.arange(len(scores)) if where is None else np.flatnonzero(cached.mask(where))
            if len(rows) > k:
                rows = rows[np.argpartition(-scores[rows], k - 1)[:k]]
            rows = rows[np.argsort(-scores[rows], kind="stable")]
            return self._hits(cur, key[0], [(int(cached.seqs[r]), float(scores[r])) for r in rows])

    def keyword_search(self, query: str, k: int = 5, where: Filter | None = None) -> list[Hit]:
        """The k chunks ranked by BM25 over the collection's analyzer (only chunks sharing a term)."""
        terms = list(dict.fromkeys(analyze(query, self.language)))
        if not terms:
            return []
        sql, params = _filter_sql(where)
        with self._db.transaction(f"search {self.name!r}") as cur:
            cid, _ = self._key(cur)
            fts = f"fts_{cid}"  # bm25() takes the table's own name, not an alias
            if len(terms) > MAX_QUERY_TERMS:
                terms = _rarest(cur, fts, terms, MAX_QUERY_TERMS)
            # The chunks table only when filtering: joining costs a lookup per matching chunk.
            join = f" join chunks_{cid} c on c.seq = {fts}.rowid" if sql else ""
            found = cur.execute(
                f"select {fts}.rowid, bm25({fts}) from {fts}{join} where {fts} match ?{sql} "
                "order by 2 limit ?", [_match(terms), *params, k]).fetchall()
            # FTS5's bm25() is lower-is-better: its negation is the BM25 score Milvus reports.
            return self._hits(cur, cid, [(seq, -score) for seq, score in found])

    def hybrid_search(self, query: str, vector: Sequence[float], k: int = 5,
                      where: Filter | None = None, fusion: str = "relative") -> list[Hit]:
        """Dense and keyword rankings fused ("relative" or "rrf"; `store.hybrid_search`)."""
        return store.hybrid_search(self, query, vector, k, where, fusion)


class SqliteDatabase:
    """Collections in one SQLite file (`kb.sqlite`), shareable by several processes."""

    def __init__(self, path: str | Path, timeout: float = BUSY_TIMEOUT_S):
        self.path = Path(path)
        self._lock = threading.RLock()  # one connection, used by the server's worker threads
        self._vectors: dict[str, _Vectors] = {}  # per collection name, loaded on first search
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("pragma journal_mode = wal")
            has_schema = self._conn.execute(
                "select 1 from sqlite_master where name = 'collections'").fetchone()
            if not has_schema:
                self._conn.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise store.StoreUnavailableError(
                f"cannot open the SQLite vector database {self.path}: {store.one_line(err)} "
                "(is it a SQLite file, writable, and not locked by a process that holds it too "
                "long?)"
            ) from err

    @contextmanager
    def transaction(self, what: str, write: bool = False) -> Iterator[sqlite3.Cursor]:
        """One transaction (a read snapshot, or a write that waits for other writers), rolled
        back on any exception; SQLite failures become one-line StoreErrors saying `what`."""
        with self._lock:
            cur = self._conn.cursor()
            try:
                cur.execute("begin immediate" if write else "begin")
                yield cur
                cur.execute("commit")
            except BaseException as err:
                if self._conn.in_transaction:
                    self._conn.rollback()
                if isinstance(err, sqlite3.OperationalError) and err.sqlite_errorcode & 0xFF in (
                        sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise store.StoreUnavailableError(
                        f"SQLite vector database {self.path} stayed locked by another process "
                        f"(could not {what}): {store.one_line(err)}") from err
                if isinstance(err, sqlite3.Error):
                    raise store.StoreError(
                        f"SQLite could not {what}: {store.one_line(err)}") from err
                raise

    def vectors(self, cur: sqlite3.Cursor, name: str, key: tuple[int, int], dim: int) -> _Vectors:
        """The collection's vectors as of `key` (its id and version), read once per version."""
        cached = self._vectors.get(name)
        if cached is None or cached.key != key:
            cached = self._vectors[name] = _Vectors.read(cur, key, dim)
        return cached

    def patch(self, name: str, before: tuple[int, int], after: tuple[int, int],
              change: _Change) -> None:
        """Apply a committed write to the cached vectors, if they were current when it began."""
        with self._lock:
            cached = self._vectors.get(name)
            if cached is not None and cached.key == before:
                self._vectors[name] = cached.patched(after, change)

    def create(self, name: str, dim: int, language: str = "en") -> SqliteStore:
        """A new empty collection; `language` picks the keyword analyzer ("en" or "zh")."""
        store.check_new_collection(name, dim, language)
        with self.transaction(f"create {name!r}", write=True) as cur:
            if self._row(cur, name):
                raise store.CollectionExistsError(f"vector collection {name!r} already exists")
            cid = cur.execute("insert into collections (name, dim, language) values (?, ?, ?)",
                              (name, dim, language)).lastrowid
            cur.execute(f"""create table chunks_{cid} (
                seq integer primary key, id text unique not null, doc_id text not null,
                text text not null, source text not null, page integer, headings text not null,
                char_start integer not null, char_end integer not null, vector blob not null)""")
            cur.execute(f"create index chunks_{cid}_doc_id on chunks_{cid} (doc_id)")
            cur.execute(f"create virtual table fts_{cid} using fts5(terms, "
                        f"tokenize={_TOKENIZER!r})")
        return SqliteStore(self, name, dim, language)

    @staticmethod
    def _row(cur: sqlite3.Cursor, name: str) -> tuple[int, int, str] | None:
        return cur.execute("select id, dim, language from collections where name = ?",
                           (name,)).fetchone()

    def open(self, name: str, dim: int | None = None) -> SqliteStore:
        """An existing collection; with `dim`, check that its vectors have that size."""
        store.check_name(name)
        with self.transaction(f"open {name!r}") as cur:
            row = self._row(cur, name)
        if row is None:
            raise store.CollectionNotFoundError(
                f"no vector collection named {name!r} at {self.path}")
        store.check_dim(name, row[1], dim)
        return SqliteStore(self, name, row[1], row[2])

    def exists(self, name: str) -> bool:
        """Whether a collection of that name exists."""
        if not COLLECTION_NAME.fullmatch(name):
            return False
        with self.transaction("list collections") as cur:
            return self._row(cur, name) is not None

    def names(self) -> list[str]:
        """Every collection, sorted."""
        with self.transaction("list collections") as cur:
            return sorted(name for (name,) in cur.execute("select name from collections"))

    def drop(self, name: str) -> None:
        """Delete a collection and its chunks; dropping an absent one does nothing."""
        if not COLLECTION_NAME.fullmatch(name):
            return
        with self.transaction(f"drop {name!r}", write=True) as cur:
            row = self._row(cur, name)
            if row is not None:
                cur.execute("delete from collections where id = ?", (row[0],))
                cur.execute(f"drop table chunks_{row[0]}")
                cur.execute(f"drop table fts_{row[0]}")
        with self._lock:
            self._vectors.pop(name, None)

    def close(self) -> None:
        """Release the file (and the cached vectors)."""
        with self._lock:
            self._vectors.clear()
            self._conn.close()
