"""Milvus Lite 3.2's search without its walk over every stored row on every query.

Milvus Lite 3.x is a pure-Python engine. Each search first decides, row by row in Python, which
stored rows are live (the newest version of their primary key and not deleted), and scores BM25
by looping over posting lists in Python. At 100k chunks that is 85 ms of a dense query whose
faiss search takes 1 ms, and 140 ms of a keyword query, so no knowledge base of that size could
answer in under 100 ms.

`install()` replaces Milvus Lite's dense search, sparse search and BM25 index for the common
state of a Pagoda collection, every row flushed to immutable segments (`MilvusStore` flushes
after each write):

- which rows are live is worked out once per state of the collection (its segments and its
  tombstones) and reused by every query until a write changes that state;
- BM25 postings live in numpy arrays instead of millions of Python tuples (which also made
  every full garbage collection of the process take a third of a second), and are scored per
  query term with the same float32 operations in the same order, so scores and ties come out
  bit-identical;
- anything else (rows still in the memtable, partition filters, another milvus-lite version)
  goes to Milvus Lite's own code.

Results equal Milvus Lite's own (tests/rag/test_milvus_lite_fastpath.py compares the two on
collections with upserts, deletes, filters and several segments). `PAGODA_MILVUS_LITE_FASTPATH=0`
turns it off.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SUPPORTED_VERSION = "3.2."
_CACHED_STATES = 8  # live-row masks kept for this many (collection, state) pairs
_installed: dict[str, Callable] = {}  # stock functions, by name, once installed
_lock = threading.Lock()
_built: weakref.WeakSet = weakref.WeakSet()  # BM25 indexes built by `_bm25_build`
_live_cache: OrderedDict[tuple[int, ...], tuple[tuple, dict, list[np.ndarray]]] = OrderedDict()
# ^ segment ids -> (weak references to their seqs arrays, tombstones, live-row masks)


def enabled() -> bool:
    """Whether the fast path may be installed (not switched off, supported milvus-lite)."""
    if os.environ.get("PAGODA_MILVUS_LITE_FASTPATH", "1") == "0":
        return False
    try:
        return metadata.version("milvus-lite").startswith(SUPPORTED_VERSION)
    except metadata.PackageNotFoundError:
        return False


def install() -> bool:
    """Patch Milvus Lite's search in this process (idempotent); False when not applicable."""
    with _lock:
        if _installed:
            return True
        if not enabled():
            log.debug("Milvus Lite fast path not installed (switched off or unsupported version)")
            return False
        from milvus_lite.engine import collection
        from milvus_lite.index.sparse_inverted import SparseInvertedIndex

        _installed.update(dense=collection.execute_search_with_index,
                          sparse=collection.Collection._search_sparse,
                          bm25_build=SparseInvertedIndex.build,
                          bm25_search=SparseInvertedIndex.search)
        collection.execute_search_with_index = _dense_search
        collection.Collection._search_sparse = _sparse_search
        SparseInvertedIndex.build = _bm25_build
        SparseInvertedIndex.search = _bm25_search
        return True


def uninstall() -> None:
    """Put Milvus Lite's own functions back (tests and benchmarks compare the two), and give the
    BM25 indexes built meanwhile the posting lists Milvus Lite's own search reads."""
    with _lock:
        if not _installed:
            return
        from milvus_lite.engine import collection
        from milvus_lite.index.sparse_inverted import SparseInvertedIndex

        for index in list(_built):
            index._posting_lists, index._df = index._pagoda_postings.to_lists()
        _built.clear()

        collection.execute_search_with_index = _installed["dense"]
        collection.Collection._search_sparse = _installed["sparse"]
        SparseInvertedIndex.build = _installed["bm25_build"]
        SparseInvertedIndex.search = _installed["bm25_search"]
        _installed.clear()
        _live_cache.clear()


# ── which rows are live ─────────────────────────────────────────────────────────────────────


def live_masks(segments: Sequence[Any], deletes: dict) -> list[np.ndarray]:
    """Per segment, which rows are live: the newest version of their key and not deleted.

    `deletes` maps a key to the sequence number of its newest delete (Milvus Lite's DeltaIndex).
    Memoised on the segments (immutable; a flush or compaction makes new ones) and the
    tombstones, which is all a flushed collection's liveness depends on. Segments are held
    weakly (through their `seqs` array: a Segment has slots and no weak references), so those
    that compaction retired are freed, and a new segment reusing a dead one's id cannot match.
    """
    key = tuple(id(segment) for segment in segments)
    with _lock:
        cached = _live_cache.get(key)
        if (cached is not None and cached[1] == deletes
                and all(ref() is segment.seqs
                        for ref, segment in zip(cached[0], segments, strict=True))):
            _live_cache.move_to_end(key)
            return cached[2]
    rows = [list(zip(segment.pks, segment.seqs.tolist(), strict=True)) for segment in segments]
    newest: dict[Any, int] = {}
    for pk, seq in (row for segment_rows in rows for row in segment_rows):
        if seq > newest.get(pk, -1):
            newest[pk] = seq
    masks = [np.fromiter((newest[pk] == seq and deletes.get(pk, -1) <= seq
                          for pk, seq in segment_rows), dtype=bool, count=len(segment_rows))
             for segment_rows in rows]
    with _lock:
        for stale in [k for k, (refs, _, _) in _live_cache.items()
                      if any(ref() is None for ref in refs)]:
            del _live_cache[stale]
        _live_cache[key] = (tuple(weakref.ref(s.seqs) for s in segments), dict(deletes), masks)
        _live_cache.move_to_end(key)
        while len(_live_cache) > _CACHED_STATES:
            _live_cache.popitem(last=False)
    return masks


def _segment_mask(segment, live: np.ndarray, compiled_filter, filter_plan) -> np.ndarray:
    """Live rows that also pass the request's scalar filter."""
    if compiled_filter is None:
        return live
    from milvus_lite.search.indexed_filter import evaluate_segment_filter

    return live & evaluate_segment_filter(segment, compiled_filter, filter_plan)


def _flushed(memtable) -> bool:
    """Whether every row and delete has left the memtable (what the fast path handles)."""
    return memtable.size() == 0


def _top(candidates: list[tuple], k: int) -> list[tuple]:
    """The k best (distance, source, order, row) candidates: ties go to the earlier segment,
    then to the segment's own order (its row for dense search, its rank for BM25), as in
    Milvus Lite."""
    return sorted(candidates, key=lambda c: c[:3])[:k]


# ── dense search (replaces search.executor_indexed.execute_search_with_index) ──────────────


def _dense_search(query_vectors: np.ndarray, segments, memtable, delta_index, top_k: int,
                  metric_type: str, pk_field: str, vector_field: str,
                  partition_names=None, compiled_filter=None, output_fields=None,
                  indexed_filter_plan=None, project_record_fn=None, search_params=None):
    """Per-segment index search over live rows, merged; Milvus Lite's own code otherwise."""
    nq = len(query_vectors)
    if (partition_names or project_record_fn is None or not _flushed(memtable)
            or nq == 0 or top_k <= 0):
        return _installed["dense"](
            query_vectors, segments, memtable, delta_index, top_k, metric_type, pk_field,
            vector_field, partition_names=partition_names, compiled_filter=compiled_filter,
            output_fields=output_fields, indexed_filter_plan=indexed_filter_plan,
            project_record_fn=project_record_fn, search_params=search_params)
    from milvus_lite.index.brute_force import BruteForceIndex

    segments = tuple(segments)
    candidates: list[list[tuple]] = [[] for _ in range(nq)]
    masks = live_masks(segments, delta_index._map)
    for source, (segment, live) in enumerate(zip(segments, masks, strict=True)):
        if segment.num_rows == 0:
            continue
        vectors, not_null = segment.vector_data(vector_field)
        mask = _segment_mask(segment, live, compiled_filter, indexed_filter_plan)
        if not_null is not None:
            mask = mask & not_null
        if not mask.any():
            continue
        index = segment.indexes.get(vector_field) or BruteForceIndex.build(vectors, metric_type)
        ids, distances = index.search(query_vectors, top_k,
                                      valid_mask=None if mask.all() else mask,
                                      params=search_params)
        for q in range(nq):
            candidates[q].extend((float(d), source, int(i), int(i))
                                 for i, d in zip(ids[q], distances[q], strict=True) if i >= 0)
    results = []
    for per_query in candidates:
        hits = []
        for distance, source, _, row in _top(per_query, top_k):
            record = segments[source].row_to_dict(row)
            pk = record[pk_field] if pk_field in record else segments[source].pks[row]
            hits.append({"id": pk, "distance": distance, "entity": project_record_fn(record)})
        results.append(hits)
    return results


# ── sparse search (replaces engine.collection.Collection._search_sparse) ────────────────────


def _sparse_search(self, query_vectors: list, vector_field: str, top_k: int, metric_type: str,
                   partition_names, expr, output_fields, timezone=None):
    """Per-segment BM25 (or IP) over live rows, merged; Milvus Lite's own code otherwise."""
    if partition_names or not _flushed(self._memtable):
        return _installed["sparse"](self, query_vectors, vector_field, top_k, metric_type,
                                    partition_names, expr, output_fields, timezone=timezone)
    from milvus_lite.engine.projection import build_projection_plan, project_record
    from milvus_lite.index.sparse_factory import _search_prepared_sparse_index

    plan = build_projection_plan(output_fields, self._schema, api_kind="search")
    queries = self._prepare_sparse_queries(query_vectors, vector_field)
    compiled_filter = self._compile_filter(expr, timezone=timezone) if expr else None
    filter_plan = self._indexed_filter_plan(compiled_filter)
    segments, deletes = self._read_snapshot()
    candidates: list[list[tuple]] = [[] for _ in queries]
    tables = []
    for segment, live in zip(segments, live_masks(segments, deletes._map), strict=True):
        table = segment.table
        if table is None or len(table) == 0:
            continue
        mask = _segment_mask(segment, live, compiled_filter, filter_plan)
        if not mask.any():
            continue
        index = _segment_sparse_index(self, segment, vector_field, metric_type)
        ids, distances = _search_prepared_sparse_index(index, queries, top_k, valid_mask=mask)
        tables.append(table)
        for q in range(len(queries)):
            hits = enumerate(zip(ids[q], distances[q], strict=True))
            candidates[q].extend((float(d), len(tables) - 1, rank, int(i))
                                 for rank, (i, d) in hits if i >= 0)
    results = []
    for per_query in candidates:
        hits = []
        for distance, source, _, row in _top(per_query, top_k):
            table = tables[source]
            record = {name: table.column(name)[row].as_py() for name in table.column_names
                      if name not in ("_seq", "_partition")}
            hits.append({"id": record[self._pk_name], "distance": distance,
                         "entity": project_record(record, self._schema, plan)})
        results.append(hits)
    return results


def _segment_sparse_index(collection, segment, field: str, metric_type: str):
    """The segment's sparse index for `field`, built on first use as Milvus Lite builds it."""
    from milvus_lite.analyzer.sparse import bytes_to_sparse
    from milvus_lite.index.sparse_factory import create_sparse_index, sparse_index_matches

    spec = collection._index_specs.get(field)
    params = spec.build_params if spec else {}
    index = segment.sparse_indexes.get(field)
    if not sparse_index_matches(index, metric_type, params):
        rows = segment.table.column(field).to_pylist()
        index = create_sparse_index(metric_type, params)
        index.build([bytes_to_sparse(r) if isinstance(r, bytes) else (r or {}) for r in rows])
        segment.sparse_indexes[field] = index
    return index


# ── BM25 index (replaces index.sparse_inverted.SparseInvertedIndex.build and .search) ───────


class _Postings:
    """Every posting list of a segment in three arrays (CSR): for term `terms[t]`, the rows
    `rows[starts[t]:starts[t+1]]` (ascending, as Milvus Lite appends them) with their term
    frequencies. Millions of (row, tf) tuples in Python lists made each full garbage
    collection of a 100k-chunk process take 350 ms; these arrays are three objects."""

    def __init__(self, terms: np.ndarray, rows: np.ndarray, tf: np.ndarray) -> None:
        order = np.argsort(terms, kind="stable")
        self.terms, first, counts = np.unique(terms[order], return_index=True,
                                              return_counts=True)
        self.starts = np.append(first, len(terms))
        self.rows = rows[order]
        self.tf = tf[order]
        self.df = counts

    @classmethod
    def from_lists(cls, posting_lists: dict[int, list[tuple[int, float]]]) -> _Postings:
        """From Milvus Lite's own `term -> [(row, tf), ...]` lists."""
        pairs = [(term, row, tf) for term, posting in posting_lists.items()
                 for row, tf in posting]
        terms, rows, tf = zip(*pairs, strict=True) if pairs else ((), (), ())
        return cls(np.asarray(terms, dtype=np.int64), np.asarray(rows, dtype=np.int64),
                   np.asarray(tf, dtype=np.float32))

    def to_lists(self) -> tuple[dict[int, list[tuple[int, float]]], dict[int, int]]:
        """Milvus Lite's own `term -> [(row, tf), ...]` lists and document frequencies."""
        rows, tf = self.rows.tolist(), self.tf.tolist()
        lists = {term: list(zip(rows[a:b], tf[a:b], strict=True))
                 for term, a, b in zip(self.terms.tolist(), self.starts[:-1].tolist(),
                                       self.starts[1:].tolist(), strict=True)}
        return lists, dict(zip(self.terms.tolist(), self.df.tolist(), strict=True))

    def get(self, term: int) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(rows, tf, document frequency) of a term, or None when no document has it."""
        t = int(np.searchsorted(self.terms, term))
        if t == len(self.terms) or self.terms[t] != term:
            return None
        span = slice(self.starts[t], self.starts[t + 1])
        return self.rows[span], self.tf[span], int(self.df[t])


def _bm25_build(self, sparse_vectors: list[dict], valid_mask: np.ndarray | None = None) -> None:
    """Index term frequencies into `_Postings` (Milvus Lite's statistics, numpy storage)."""
    from milvus_lite.index.sparse_common import validate_mask

    n = len(sparse_vectors)
    valid_mask = validate_mask(valid_mask, n)
    kept = [i for i in range(n) if valid_mask is None or valid_mask[i]]
    vectors = [sparse_vectors[i] or {} for i in kept]
    sizes = np.fromiter(map(len, vectors), dtype=np.int64, count=len(vectors))
    terms = np.fromiter((t for v in vectors for t in v), dtype=np.int64, count=int(sizes.sum()))
    tf = np.fromiter((f for v in vectors for f in v.values()), dtype=np.float64,
                     count=int(sizes.sum()))
    rows = np.repeat(np.asarray(kept, dtype=np.int64), sizes)
    lengths = np.zeros(n, dtype=np.float64)
    np.add.at(lengths, rows, tf)  # term frequencies are counts: exact in any order
    self.doc_count = len(kept)
    self.avgdl = float(lengths.sum()) / self.doc_count if self.doc_count else 0.0
    self._doc_lengths = lengths.astype(np.float32)
    self._posting_lists, self._df = {}, {}
    self._pagoda_postings = _Postings(terms, rows, tf.astype(np.float32))
    _built.add(self)


def _bm25_search(self, query_sparse_vectors: list[dict], top_k: int,
                 valid_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """BM25 top-k with numpy, term by term, reproducing the scalar loop's float32 arithmetic.

    Milvus Lite scores `idf * tf*(k1+1) / (tf + k1*(1-b+b*dl/avgdl)) * weight` per posting in
    Python with float32 document lengths (so, under NumPy 2, in float32) and sums a document's
    terms in query order; ties keep the order in which documents were first scored.
    """
    from milvus_lite.index.sparse_common import empty_results, validate_mask

    n = len(self._doc_lengths)
    valid_mask = validate_mask(valid_mask, n)
    ids_out, distances_out = empty_results(len(query_sparse_vectors), top_k)
    if self.doc_count == 0:
        return ids_out, distances_out
    postings = self.__dict__.get("_pagoda_postings")
    if postings is None:  # built by Milvus Lite's own build()
        postings = self._pagoda_postings = _Postings.from_lists(self._posting_lists)
    denominators = _bm25_denominators(self)
    for q, terms in enumerate(query_sparse_vectors):
        scores = np.zeros(n, dtype=np.float32)
        first_term = np.full(n, len(terms), dtype=np.int64)  # which term scored it first
        for position, (term, weight) in enumerate(terms.items()):
            found = postings.get(term)
            if found is None:
                continue
            rows, tf, df = found
            if valid_mask is not None:
                keep = valid_mask[rows]
                rows, tf = rows[keep], tf[keep]
            idf = math.log((self.doc_count - df + 0.5) / (df + 0.5) + 1.0)
            numerators = (tf.astype(np.float64) * (self.k1 + 1.0)).astype(np.float32)
            scores[rows] += np.float32(idf) * (numerators / (tf + denominators[rows])) \
                * np.float32(weight)
            first_term[rows] = np.minimum(first_term[rows], position)  # rows are unique
        scored = np.flatnonzero(first_term < len(terms))
        if scored.size == 0:
            continue
        order = np.lexsort((scored, first_term[scored], -scores[scored]))[:top_k]
        best = scored[order]
        ids_out[q, :len(best)] = best
        distances_out[q, :len(best)] = -scores[best]
    return ids_out, distances_out


def _bm25_denominators(index) -> np.ndarray:
    """Per document `k1*(1-b+b*dl/avgdl)` in float32, cached on the (immutable) index."""
    cached = index.__dict__.get("_pagoda_denominators")
    if cached is None:
        avgdl = index.avgdl if index.avgdl > 0 else 1.0
        lengths = np.asarray(index._doc_lengths, dtype=np.float32)
        cached = index.k1 * ((1.0 - index.b) + index.b * lengths / avgdl)
        index._pagoda_denominators = cached
    return cached
