"""The vector store interface: chunks in, ranked hits out (dense, BM25 keyword, hybrid).

Knowledge-base code talks only to `VectorDatabase` (named collections) and `VectorStore` (one
collection), so Milvus — the default, see `milvus_store` — and any other backend (sqlite-vec +
FTS5, Qdrant, ...) are interchangeable. The interface is deliberately small: what a backend must
do is add and delete chunks, count them, and rank them three ways under a metadata filter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pagoda.errors import PagodaError

RRF_K = 60  # the constant of Cormack et al. (2009); dampens the weight of the very first ranks
LANGUAGES = ("en", "zh")  # analyzers a collection can be created with (keyword search)


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


def rrf(rankings: Sequence[Sequence[str]], k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion: score(id) = sum over rankings of 1 / (k + rank), ranks from 1.

    It uses ranks only, so BM25 scores and cosine similarities need no common scale. Returns
    (id, score) best first; ties keep the order in which ids were first seen.
    """
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: -pair[1])


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
                      where: Filter | None = None) -> list[Hit]:
        """Dense and keyword rankings fused by reciprocal-rank fusion (k=60)."""
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
