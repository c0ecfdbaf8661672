"""The default vector store: Milvus, embedded (Milvus Lite under $PAGODA_HOME) or a server by URI.

One collection per knowledge base. Milvus computes BM25 itself: the `text` field carries an
analyzer (standard for English, jieba for Chinese) and a BM25 function fills the sparse `bm25`
field on insert, so keyword search sends raw text and the corpus statistics stay in Milvus.
Hybrid search fuses the dense and BM25 rankings in Pagoda (`store.hybrid_search`), the same
way for every backend. The same code serves `milvus.db` (Milvus Lite, in-process) and
`http://host:19530` (a Milvus server or cluster, optionally with a token).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import numpy as np
from pymilvus import (
    DataType,
    Function,
    FunctionType,
    MilvusClient,
    MilvusException,
)

from pagoda.paths import pagoda_home
from pagoda.rag import milvus_lite_fastpath
from pagoda.rag.store import (
    COLLECTION_NAME,
    ENGLISH_STOP_WORDS,
    MAX_TEXT_BYTES,
    Chunk,
    ChunkMeta,
    CollectionExistsError,
    CollectionNotFoundError,
    Filter,
    Hit,
    InvalidStoreRequestError,
    StoreError,
    StoreUnavailableError,
    as_vector,
    check_dim,
    check_name,
    check_new_collection,
    check_text,
    hybrid_search,
    one_line,
)

# Analyzer parameters per language, in the form both Milvus and Milvus Lite read. `zh` is what
# Milvus' built-in "chinese" analyzer expands to (jieba tokenizer, keep CJK letters and digits);
# Milvus Lite understands only the tokenizer part, which is the part that matters.
ANALYZERS: dict[str, dict] = {
    "en": {"tokenizer": "standard",
           "filter": ["lowercase", {"type": "stop", "stop_words": sorted(ENGLISH_STOP_WORDS)}]},
    "zh": {"tokenizer": "jieba", "filter": ["cnalphanumonly"]},
}
_OUTPUT = ["doc_id", "text", "source", "page", "headings", "char_start", "char_end", "vector"]
# Milvus Lite's engine is single-writer per collection; one lock for the process is simpler and
# costs nothing that matters (ingest is bound by the embedder).
_EMBEDDED_WRITES = threading.Lock()


def default_uri() -> str:
    """The embedded Milvus Lite database: `$PAGODA_HOME/vectors/milvus.db`."""
    return str(pagoda_home() / "vectors" / "milvus.db")


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "unix:"))


@contextmanager
def _failures(what: str) -> Iterator[None]:
    """Turn a Milvus exception into a one-line StoreError saying what was being done."""
    try:
        yield
    except MilvusException as err:
        raise StoreError(f"Milvus could not {what}: {one_line(err)}") from err


def _literal_list(values: Sequence[str]) -> str:
    """A Milvus filter list of string literals (JSON quoting is Milvus' escaping)."""
    return "[" + ", ".join(json.dumps(v, ensure_ascii=False) for v in values) + "]"


def filter_expression(where: Filter | None) -> str:
    """The Milvus boolean expression for a filter ("" keeps everything)."""
    if where is None:
        return ""
    parts = []
    if where.doc_ids is not None:
        parts.append(f"doc_id in {_literal_list(where.doc_ids)}")
    if where.sources is not None:
        parts.append(f"source in {_literal_list(where.sources)}")
    return " and ".join(parts)


def _hit(raw, score: float | None = None) -> Hit:
    entity = raw["entity"]
    page = int(entity["page"])
    return Hit(id=str(raw["id"]), doc_id=entity["doc_id"], text=entity["text"],
               score=float(raw["distance"] if score is None else score),
               meta=ChunkMeta(source=entity["source"], page=None if page < 0 else page,
                              headings=tuple(json.loads(entity["headings"])),
                              start=int(entity["char_start"]), end=int(entity["char_end"])),
               vector=np.asarray(entity["vector"], dtype=np.float32))


class MilvusStore:
    """One Milvus collection of chunks; see `pagoda.rag.store.VectorStore`."""

    def __init__(self, client: MilvusClient, name: str, dim: int, embedded: bool = False):
        self._client = client
        self.name = name
        self.dim = dim
        self._embedded = embedded

    def _call(self, method: str, **kwargs):
        """Run a client method on this collection, turning Milvus failures into StoreErrors."""
        try:
            return getattr(self._client, method)(collection_name=self.name, **kwargs)
        except MilvusException as err:
            raise self._explain(method, err) from err

    def _explain(self, method: str, err: MilvusException) -> StoreError:
        """Why a call failed: the server went away, the collection was dropped, or else."""
        try:
            gone = not self._client.has_collection(collection_name=self.name)
        except MilvusException:
            return StoreUnavailableError(
                f"lost the Milvus connection during {method} on {self.name!r}: {one_line(err)}")
        if gone:
            return CollectionNotFoundError(f"vector collection {self.name!r} no longer exists")
        return StoreError(f"Milvus {method} on {self.name!r} failed: {one_line(err)}")

    def _vector(self, vector: Sequence[float]) -> list[float]:
        return as_vector(vector, self.name, self.dim).tolist()

    def _row(self, chunk: Chunk) -> dict:
        check_text(chunk)
        meta = chunk.meta
        return {"id": chunk.id, "doc_id": chunk.doc_id, "text": chunk.text,
                "vector": self._vector(chunk.vector), "source": meta.source,
                "page": -1 if meta.page is None else meta.page,
                "headings": json.dumps(list(meta.headings), ensure_ascii=False),
                "char_start": meta.start, "char_end": meta.end}

    def _writing(self) -> AbstractContextManager:
        """Serialise writes to an embedded database (Milvus Lite is single-writer)."""
        return _EMBEDDED_WRITES if self._embedded else nullcontext()

    def add(self, chunks: Sequence[Chunk]) -> None:
        """Insert chunks; a chunk whose id is already stored replaces it."""
        if not chunks:
            return
        rows = list({row["id"]: row for row in map(self._row, chunks)}.values())  # last wins
        with self._writing():
            self._call("upsert", data=rows)
            if self._embedded:
                # Milvus Lite searches rows still in its memtable one by one in Python (5-10x
                # slower at 5k chunks than flushed, indexed segments, and off the fast path of
                # `milvus_lite_fastpath`); a Milvus server seals segments itself and
                # rate-limits explicit flushes.
                self._call("flush")

    def delete_document(self, doc_id: str) -> None:
        """Remove every chunk of a document; deleting an absent document does nothing."""
        with self._writing():
            self._call("delete", filter=filter_expression(Filter(doc_ids=[doc_id])))
            if self._embedded:
                self._call("flush")  # tombstones in the memtable take searches off the fast path

    def count(self, where: Filter | None = None) -> int:
        """How many chunks are stored (that pass the filter)."""
        rows = self._call("query", filter=filter_expression(where), output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def dense_search(self, vector: Sequence[float], k: int = 5,
                     where: Filter | None = None) -> list[Hit]:
        """The k chunks whose vectors are most cosine-similar to `vector`."""
        found = self._call("search", data=[self._vector(vector)], anns_field="vector",
                           search_params={"metric_type": "COSINE"}, limit=k,
                           filter=filter_expression(where), output_fields=_OUTPUT)
        return [_hit(raw) for raw in found[0]]

    def keyword_search(self, query: str, k: int = 5, where: Filter | None = None) -> list[Hit]:
        """The k chunks ranked by BM25 over the collection's analyzer (only chunks sharing a term)."""
        if not query.strip():
            return []
        found = self._call("search", data=[query], anns_field="bm25",
                           search_params={"metric_type": "BM25"}, limit=k,
                           filter=filter_expression(where), output_fields=_OUTPUT)
        # Milvus reports the BM25 score as the distance; Milvus Lite 3.2 reports its negation.
        return [_hit(raw, score=abs(raw["distance"])) for raw in found[0]]

    def hybrid_search(self, query: str, vector: Sequence[float], k: int = 5,
                      where: Filter | None = None, fusion: str = "relative") -> list[Hit]:
        """Dense and keyword rankings fused ("relative" or "rrf"; `store.hybrid_search`)."""
        return hybrid_search(self, query, vector, k, where, fusion)


class MilvusDatabase:
    """Collections in Milvus Lite (a local `.db` path) or a Milvus server (`http://host:19530`)."""

    def __init__(self, uri: str | Path | None = None, token: str = "", timeout: float = 10.0):
        self.uri = str(uri or default_uri())
        self._embedded = not _is_server(self.uri)
        if self._embedded:
            if not self.uri.endswith(".db"):
                raise InvalidStoreRequestError(
                    f"Milvus URI {self.uri!r} is neither a server (http://host:19530) nor a "
                    "Milvus Lite path ending in .db")
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
            milvus_lite_fastpath.install()
        # Milvus Lite logs a traceback when it cannot start; the error below says it in one line.
        lite_log = logging.getLogger("milvus_lite.server_manager")
        lite_log_was_disabled, lite_log.disabled = lite_log.disabled, True
        try:
            self._client = MilvusClient(uri=self.uri, token=token, timeout=timeout)
        except Exception as err:  # grpc, connection and Lite start-up errors all mean "unreachable"
            hint = ("Milvus Lite lets one process open a database at a time: is another "
                    "pagoda command or server using it? To share one, run a Milvus server"
                    if self._embedded else "is the server running and the URI right?")
            raise StoreUnavailableError(
                f"cannot open Milvus at {self.uri}: {one_line(err)} ({hint})") from err
        finally:
            lite_log.disabled = lite_log_was_disabled

    def create(self, name: str, dim: int, language: str = "en") -> MilvusStore:
        """A new empty collection; `language` picks the keyword analyzer ("en" or "zh")."""
        check_new_collection(name, dim, language)
        if self.exists(name):
            raise CollectionExistsError(f"vector collection {name!r} already exists")
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=512)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES,
                         enable_analyzer=True, analyzer_params=ANALYZERS[language])
        schema.add_field("bm25", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("source", DataType.VARCHAR, max_length=4096)
        schema.add_field("page", DataType.INT64)
        schema.add_field("headings", DataType.VARCHAR, max_length=4096)
        schema.add_field("char_start", DataType.INT64)
        schema.add_field("char_end", DataType.INT64)
        schema.add_function(Function(name="text_bm25", function_type=FunctionType.BM25,
                                     input_field_names=["text"], output_field_names=["bm25"]))
        index = MilvusClient.prepare_index_params()
        index.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="COSINE")
        index.add_index(field_name="bm25", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        with _failures(f"create {name!r}"):
            self._client.create_collection(collection_name=name, schema=schema,
                                           index_params=index, consistency_level="Strong")
        return MilvusStore(self._client, name, dim, embedded=self._embedded)

    def open(self, name: str, dim: int | None = None) -> MilvusStore:
        """An existing collection; with `dim`, check that its vectors have that size."""
        check_name(name)
        if not self.exists(name):
            raise CollectionNotFoundError(f"no vector collection named {name!r} at {self.uri}")
        with _failures(f"describe {name!r}"):
            fields = self._client.describe_collection(collection_name=name)["fields"]
        stored = int(next(f for f in fields if f["name"] == "vector")["params"]["dim"])
        check_dim(name, stored, dim)
        with _failures(f"load {name!r}"):
            self._client.load_collection(collection_name=name)
        return MilvusStore(self._client, name, stored, embedded=self._embedded)

    def exists(self, name: str) -> bool:
        """Whether a collection of that name exists."""
        if not COLLECTION_NAME.fullmatch(name):
            return False
        with _failures("list collections"):
            return self._client.has_collection(collection_name=name)

    def names(self) -> list[str]:
        """Every collection, sorted."""
        with _failures("list collections"):
            return sorted(self._client.list_collections())

    def drop(self, name: str) -> None:
        """Delete a collection and its chunks; dropping an absent one does nothing."""
        if self.exists(name):
            with _failures(f"drop {name!r}"):
                self._client.drop_collection(collection_name=name)

    def close(self) -> None:
        """Release the connection."""
        self._client.close()
