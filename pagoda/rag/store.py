"""The vector store interface: chunks in, ranked hits out (dense, BM25 keyword, hybrid).

Knowledge-base code talks only to `VectorDatabase` (named collections) and `VectorStore` (one
collection), so Milvus — the default, see `milvus_store` — SQLite + FTS5 (`sqlite_store`) and any
other backend are interchangeable (`databases.open_database` picks one by URI). The interface is
deliberately small: what a backend must do is add and delete chunks, count them, and rank them
three ways under a metadata filter. The checks every backend makes the same way (collection
names, dimensions, chunk sizes) and the English stop words both analyzers drop live here too,
so a knowledge base behaves alike whichever backend holds it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from pagoda.errors import PagodaError

LANGUAGES = ("en", "zh")  # analyzers a collection can be created with (keyword search)
FUSION_DEPTH = 50  # each ranking fused by hybrid search holds this many candidates (or k if more)
FUSIONS = ("relative", "rrf")  # hybrid search: relative score fusion (default) or RRF
RRF_K = 60  # the constant of Cormack et al. (2009); dampens the weight of the very first ranks
DENSE_WEIGHT = 0.5  # hybrid search: the dense ranking's share of the fused score (BM25: the rest)
MAX_TEXT_BYTES = 65_535  # Milvus' VARCHAR limit, kept by every backend so chunks fit them all
# Names every backend accepts (Milvus' rule): a letter or underscore, then letters, digits, _.
COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
# English function words (NLTK's list): they carry no topic, and in an inverted index they are
# the longest posting lists, so dropping them at index and query time makes BM25 both sharper
# and far cheaper (Lucene's and Elasticsearch's English analyzers do the same).
ENGLISH_STOP_WORDS = frozenset("""
a about above after again against ain all am an and any are aren aren't as at be because been
before being below between both but by can couldn couldn't d did didn didn't do does doesn
doesn't doing don don't down during each few for from further had hadn hadn't has hasn hasn't
have haven haven't having he her here hers herself him himself his how i if in into is isn
isn't it it's its itself just ll m ma me mightn mightn't more most mustn mustn't my myself
needn needn't no nor not now o of off on once only or other our ours ourselves out over own re
s same shan shan't she she's should should've shouldn shouldn't so some such t than that
that'll the their theirs them themselves then there these they this those through to too
under until up ve very was wasn wasn't we were weren weren't what when where which while who
whom why will with won won't wouldn wouldn't y you you'd you'll you're you've your yours
yourself yourselves
""".split())


@dataclass(frozen=True)
class ChunkMeta:
    """Where a chunk came from: enough to cite it (document, page, headings, character span)."""

    source: str = ""  # the document as the user added it (path or upload name)
    page: int | None = None  # 1-based page for paged formats (PDF), else None
    headings: tuple[str, ...] = ()  # heading path, outermost first
    start: int = 0  # character offsets of the chunk in the document's text
    end: int = 0


@dataclass(frozen=True)
class Chunk:
    """A piece of a document with its dense vector, as stored."""

    id: str  # unique in the collection; re-adding an id replaces the chunk
    doc_id: str  # every chunk of one document shares it (deletes go by document)
    text: str
    vector: Sequence[float]
    meta: ChunkMeta = field(default_factory=ChunkMeta)


@dataclass(frozen=True)
class Hit:
    """One search result: higher `score` is better (cosine, BM25 or fused RRF score)."""

    id: str
    doc_id: str
    text: str
    score: float
    meta: ChunkMeta
    # The stored vector when the backend returns it, so callers can compare it with the
    # question's without embedding the passage again.
    vector: Sequence[float] | None = None


@dataclass(frozen=True)
class Filter:
    """Keep only chunks whose document id and source are in the given lists (None: any)."""

    doc_ids: Sequence[str] | None = None
    sources: Sequence[str] | None = None


def relative_score_fusion(rankings: Sequence[Sequence[tuple[str, float]]],
                          weights: Sequence[float]) -> list[tuple[str, float]]:
    """Fuse (id, score) rankings: each ranking's scores are min-max scaled to [0, 1] over its own
    candidates, weighted and summed (Weaviate's relativeScoreFusion; an id absent from a
    ranking gets 0 from it). Returns (id, fused score) best first; ties keep first-seen order.

    Unlike reciprocal-rank fusion it keeps how far apart the scores are: a passage BM25 finds
    far ahead of the rest stays ahead even when the dense ranking missed it, and the other way
    round. On the retrieval benchmark it beats both single rankings where RRF(60) lost to BM25.
    """
    fused: dict[str, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        if not ranking:
            continue
        high = max(score for _, score in ranking)
        low = min(score for _, score in ranking)
        for item, score in ranking:
            scaled = (score - low) / (high - low) if high > low else 1.0
            fused[item] = fused.get(item, 0.0) + weight * scaled
    return sorted(fused.items(), key=lambda pair: -pair[1])


def rrf(rankings: Sequence[Sequence[str]], k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion (Cormack et al., 2009): score(id) = sum of 1 / (k + rank), ranks
    from 1. It uses ranks only, so scores need no common scale. Best first; ties keep first-seen
    order."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: -pair[1])


def hybrid_search(backend: VectorStore, query: str, vector: Sequence[float], k: int,
                  where: Filter | None, fusion: str = "relative") -> list[Hit]:
    """A backend's dense and keyword rankings (FUSION_DEPTH deep) fused by relative score
    fusion (default) or reciprocal-rank fusion (`fusion="rrf"`); done here, not in the
    database, so every backend ranks alike."""
    if fusion not in FUSIONS:
        raise InvalidStoreRequestError(f"unknown fusion {fusion!r}; use one of {list(FUSIONS)}")
    if not query.strip():
        return backend.dense_search(vector, k, where)
    depth = max(k, FUSION_DEPTH)
    dense = backend.dense_search(vector, depth, where)
    keyword = backend.keyword_search(query, depth, where)
    found = {hit.id: hit for hit in keyword + dense}
    if fusion == "rrf":
        fused = rrf([[h.id for h in dense], [h.id for h in keyword]])
    else:
        fused = relative_score_fusion([[(h.id, h.score) for h in dense],
                                       [(h.id, h.score) for h in keyword]],
                                      [DENSE_WEIGHT, 1 - DENSE_WEIGHT])
    return [replace(found[item], score=score) for item, score in fused[:k]]


class VectorStore(Protocol):
    """One collection of chunks (one knowledge base) with a fixed vector dimension."""

    name: str
    dim: int

    def add(self, chunks: Sequence[Chunk]) -> None:
        """Insert chunks; a chunk whose id is already stored replaces it."""
        ...

    def delete_document(self, doc_id: str) -> None:
        """Remove every chunk of a document; deleting an absent document does nothing."""
        ...

    def count(self, where: Filter | None = None) -> int:
        """How many chunks are stored (that pass the filter)."""
        ...

    def dense_search(self, vector: Sequence[float], k: int = 5,
                     where: Filter | None = None) -> list[Hit]:
        """The k chunks whose vectors are most cosine-similar to `vector`."""
        ...

    def keyword_search(self, query: str, k: int = 5, where: Filter | None = None) -> list[Hit]:
        """The k chunks ranked by BM25 over the collection's analyzer (only chunks sharing a term)."""
        ...

    def hybrid_search(self, query: str, vector: Sequence[float], k: int = 5,
                      where: Filter | None = None, fusion: str = "relative") -> list[Hit]:
        """Dense and keyword rankings fused (see `hybrid_search`: "relative" or "rrf")."""
        ...


class VectorDatabase(Protocol):
    """Where collections live: an embedded file or a server."""

    def create(self, name: str, dim: int, language: str = "en") -> VectorStore:
        """A new empty collection; `language` picks the keyword analyzer (see LANGUAGES)."""
        ...

    def open(self, name: str, dim: int | None = None) -> VectorStore:
        """An existing collection; with `dim`, check that its vectors have that size."""
        ...

    def exists(self, name: str) -> bool:
        """Whether a collection of that name exists."""
        ...

    def names(self) -> list[str]:
        """Every collection, sorted."""
        ...

    def drop(self, name: str) -> None:
        """Delete a collection and its chunks; dropping an absent one does nothing."""
        ...

    def close(self) -> None:
        """Release the connection (and, embedded, the files)."""
        ...


class StoreError(PagodaError):
    """The vector store failed an operation that should have worked."""

    http_status = 500
    error_type = "server_error"


class InvalidStoreRequestError(StoreError):
    """A collection name, language, chunk or query the store cannot take."""

    http_status = 400
    error_type = "invalid_request_error"


class DimensionMismatchError(InvalidStoreRequestError):
    """A vector's size differs from the collection's (usually: a different embedder)."""


class CollectionNotFoundError(InvalidStoreRequestError):
    """No collection of that name."""

    http_status = 404
    code = "collection_not_found"


class CollectionExistsError(InvalidStoreRequestError):
    """A collection of that name already exists."""

    http_status = 409
    code = "collection_exists"


class StoreUnavailableError(StoreError):
    """The vector database cannot be reached (server down, wrong URI, locked file)."""

    http_status = 503


def one_line(err: BaseException) -> str:
    """A backend exception's message on one line, for the error a user sees."""
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())


def check_name(name: str) -> None:
    """Raise InvalidStoreRequestError unless `name` is a valid collection name."""
    if not COLLECTION_NAME.fullmatch(name):
        raise InvalidStoreRequestError(
            f"invalid collection name {name!r}: use letters, digits and underscores, "
            "starting with a letter or underscore (at most 255 characters)")


def check_new_collection(name: str, dim: int, language: str) -> None:
    """What `VectorDatabase.create` checks before it asks the backend for anything."""
    check_name(name)
    if language not in LANGUAGES:
        raise InvalidStoreRequestError(
            f"unknown language {language!r} for keyword search; use one of {list(LANGUAGES)}")
    if dim < 1:
        raise InvalidStoreRequestError(f"vector dimension must be positive, got {dim}")


def check_dim(name: str, stored: int, dim: int | None) -> None:
    """`VectorDatabase.open(name, dim)`: the stored collection must hold `dim`-sized vectors."""
    if dim is not None and dim != stored:
        raise DimensionMismatchError(
            f"collection {name!r} holds {stored}-dimensional vectors, not {dim} "
            "(was it built with another embedder?)")


def as_vector(vector: Sequence[float], name: str, dim: int) -> np.ndarray:
    """`vector` as float32, or DimensionMismatchError when collection `name` holds another size."""
    array = np.asarray(vector, dtype=np.float32)
    if array.shape != (dim,):
        raise DimensionMismatchError(
            f"vector of shape {array.shape} for collection {name!r}, which holds "
            f"{dim}-dimensional vectors (was it built with another embedder?)")
    return array


def check_text(chunk: Chunk) -> None:
    """Raise InvalidStoreRequestError for a chunk whose text is over MAX_TEXT_BYTES."""
    size = len(chunk.text.encode())
    if size > MAX_TEXT_BYTES:
        raise InvalidStoreRequestError(
            f"chunk {chunk.id!r} has {size} bytes of text; the store takes at most "
            f"{MAX_TEXT_BYTES} (split the document into smaller chunks)")
