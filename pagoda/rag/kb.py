"""Knowledge bases: documents in, cited answers out.

A knowledge base is a manifest (`$PAGODA_HOME/kb/<name>.json`: embedder, language, owner, and
per document its content hash and chunk ids) plus one vector collection. Adding a file loads it,
splits it into chunks that fit the embedder, embeds them and stores them; re-adding an unchanged
file does nothing, a changed one replaces its chunks, removing one deletes them.

The manifest is the commit point, written atomically: new chunks are stored under a
version-specific document id first, then the manifest switches the source to them, then the old
version's chunks are deleted. Ids about to be written or deleted are recorded in the manifest's
`pending` list beforehand, and opening a knowledge base deletes any that no document owns — so
a crash mid-ingest leaves the knowledge base as it was before that document, never half-indexed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pagoda.client import EmbeddingClient
from pagoda.errors import DocumentError, InvalidRequestError, PagodaError
from pagoda.paths import atomic_write, pagoda_home
from pagoda.rag.loaders import load_bytes
from pagoda.rag.rerank import ChatReranker
from pagoda.rag.splitter import Chunk as Piece
from pagoda.rag.splitter import Splitter
from pagoda.rag.store import FUSIONS, Chunk, ChunkMeta, Filter, Hit, VectorDatabase, VectorStore

_NAME = re.compile(r"[\w-][\w.-]{0,63}")  # letters of any script, digits, _ . - (no dot first)
EMBED_BATCH = 256  # chunks per embedding call (sorted by length inside it; progress per batch)
MODES = ("hybrid", "dense", "keyword")
RERANK_CANDIDATES = 20  # passages a reranker judges; it keeps the best k of them
# Embedders trained with instruction prefixes (E5): (query prefix, passage prefix).
PREFIXES: dict[str, tuple[str, str]] = {"e5-small-multilingual": ("query: ", "passage: ")}


class KnowledgeBaseNotFoundError(PagodaError):
    """No knowledge base of that name (for this owner)."""

    http_status = 404
    code = "knowledge_base_not_found"


class KnowledgeBaseExistsError(PagodaError):
    """A knowledge base of that name already exists."""

    http_status = 409
    code = "knowledge_base_exists"


@dataclass
class DocumentRecord:
    """One added document: which version (content hash) is indexed, under which id."""

    source: str
    sha256: str
    doc_id: str
    chunks: int
    format: str
    added: float


# Chunks of 128 tokens: the length all-MiniLM was trained on (longer text dilutes its mean-pooled
# vector), five of them fit a small chat model's prompt with room to answer, and embedding cost
# grows faster than linearly with length. Overlap: about one sentence.
DEFAULT_CHUNK_SIZE = 128
DEFAULT_CHUNK_OVERLAP = 20


@dataclass
class Manifest:
    """Everything about a knowledge base except its vectors."""

    name: str
    embedder: str
    dim: int
    language: str = "en"
    owner: str | None = None  # hash of the API key that created it; None: no auth
    chunk_size: int = DEFAULT_CHUNK_SIZE
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP
    created: float = field(default_factory=time.time)
    documents: dict[str, DocumentRecord] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)  # doc ids being written or deleted

    def visible_to(self, owner: str | None) -> bool:
        """Whether `owner` may see it: its creator, or anyone when it has no owner."""
        return self.owner is None or self.owner == owner

    @property
    def collection(self) -> str:
        """Milvus-safe collection name (knowledge-base names may be Chinese or contain '-')."""
        return "kb_" + hashlib.sha256(self.name.encode()).hexdigest()[:24]

    @classmethod
    def read(cls, path: Path) -> Manifest:
        data = json.loads(path.read_text(encoding="utf-8"))
        docs = {s: DocumentRecord(**d) for s, d in data.pop("documents").items()}
        return cls(**data, documents=docs)

    def write(self, path: Path) -> None:
        """Atomic: a temporary file, fsynced, renamed over the old one."""
        atomic_write(path, json.dumps(asdict(self), ensure_ascii=False, indent=1))


@dataclass
class AddResult:
    """What adding one document did."""

    source: str
    status: str  # "added", "updated" or "unchanged"
    chunks: int


class KnowledgeBase:
    """One knowledge base: its manifest, its vector collection and the embedder it was built with."""

    def __init__(self, manifest: Manifest, path: Path, store: VectorStore,
                 embedder: EmbeddingClient) -> None:
        if embedder.model != manifest.embedder:
            raise InvalidRequestError(
                f"knowledge base {manifest.name!r} was built with embedder {manifest.embedder!r}, "
                f"not {embedder.model!r}")
        self.manifest = manifest
        self.path = path
        self.store = store
        self.embedder = embedder
        size = min(manifest.chunk_size, embedder.max_tokens)
        self.splitter = Splitter(size, min(manifest.chunk_overlap, size // 2),
                                 embedder.count_tokens)
        self._recover()

    @property
    def name(self) -> str:
        return self.manifest.name

    # ------------------------------------------------------------------ documents
    async def add(self, data: bytes, source: str,
                  progress: Callable[[int, int], None] | None = None) -> AddResult:
        """Index a file's content under `source` (its path or upload name)."""
        digest = hashlib.sha256(data).hexdigest()
        old = self.manifest.documents.get(source)
        if old is not None and old.sha256 == digest:
            return AddResult(source, "unchanged", old.chunks)
        document = load_bytes(data, source)
        pieces = self.splitter.split(document)
        if not pieces:
            raise DocumentError(f"{source}: there is no text to index")
        doc_id = hashlib.sha256(f"{source}\0{digest}".encode()).hexdigest()[:32]
        self._set_pending([doc_id])
        await self._store_pieces(doc_id, pieces, progress)
        self.manifest.documents[source] = DocumentRecord(source, digest, doc_id, len(pieces),
                                                         document.format, time.time())
        self._set_pending([old.doc_id] if old else [])  # the commit point
        if old:
            self.store.delete_document(old.doc_id)
            self._set_pending([])
        return AddResult(source, "updated" if old else "added", len(pieces))

    async def _store_pieces(self, doc_id: str, pieces: Sequence[Piece],
                            progress: Callable[[int, int], None] | None) -> None:
        """Embed and store a document's pieces EMBED_BATCH at a time; the next batch embeds
        (on the embedder's thread or server) while this one is written to the store."""
        starts = range(0, len(pieces), EMBED_BATCH)

        def embed(start: int) -> asyncio.Task:
            texts = [p.text for p in pieces[start:start + EMBED_BATCH]]
            return asyncio.ensure_future(self._embed(texts, passage=True))

        pending = embed(0)
        try:
            for start in starts:
                vectors = await pending
                if start + EMBED_BATCH < len(pieces):
                    pending = embed(start + EMBED_BATCH)
                batch = pieces[start:start + EMBED_BATCH]
                self.store.add([Chunk(f"{doc_id}:{start + i}", doc_id, p.text, v,
                                      ChunkMeta(p.source, p.page, p.heading_path, p.start, p.end))
                                for i, (p, v) in enumerate(zip(batch, vectors, strict=True))])
                if progress:
                    progress(start + len(batch), len(pieces))
        finally:
            pending.cancel()  # a failed write leaves no embedding running for nothing

    async def add_file(self, path: str | Path,
                       progress: Callable[[int, int], None] | None = None) -> AddResult:
        """Index the file at `path`; the path as given is its source."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise DocumentError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
        return await self.add(data, str(path), progress)

    def remove(self, source: str) -> DocumentRecord:
        """Delete a document and all its chunks."""
        record = self.manifest.documents.get(source)
        if record is None:
            known = ", ".join(sorted(self.manifest.documents)) or "none"
            raise InvalidRequestError(f"knowledge base {self.name!r} has no document "
                                      f"{source!r} (documents: {known})")
        del self.manifest.documents[source]
        self._set_pending([record.doc_id])
        self.store.delete_document(record.doc_id)
        self._set_pending([])
        return record

    def documents(self) -> list[DocumentRecord]:
        return sorted(self.manifest.documents.values(), key=lambda d: d.added)

    # ------------------------------------------------------------------ retrieval
    async def query(self, question: str, k: int = 5, mode: str = "hybrid",
                    sources: Sequence[str] | None = None,
                    vector: np.ndarray | None = None, fusion: str = "relative",
                    reranker: ChatReranker | None = None) -> list[Hit]:
        """The k passages most relevant to `question`, best first (`vector`: the question's
        embedding, when the caller already has it). `fusion` picks how hybrid search merges
        its two rankings; a `reranker` reorders the best RERANK_CANDIDATES before keeping k."""
        if not question.strip():
            raise InvalidRequestError("the question is empty")
        if mode not in MODES:
            raise InvalidRequestError(f"unknown search mode {mode!r}; use one of {list(MODES)}")
        if fusion not in FUSIONS:
            raise InvalidRequestError(f"unknown fusion {fusion!r}; use one of {list(FUSIONS)}")
        if not 1 <= k <= 100:
            raise InvalidRequestError(f"top-k must be in 1..100, got {k}")
        depth = max(k, RERANK_CANDIDATES) if reranker is not None else k
        hits = await self._search(question, depth, mode, self._filter(sources), vector, fusion)
        return hits if reranker is None else await reranker.rerank(question, hits, k)

    async def _search(self, question: str, k: int, mode: str, where: Filter | None,
                      vector: np.ndarray | None, fusion: str) -> list[Hit]:
        if mode == "keyword":
            return self.store.keyword_search(question, k, where)
        if vector is None:
            vector = await self.embed_query(question)
        if mode == "dense":
            return self.store.dense_search(vector, k, where)
        return self.store.hybrid_search(question, vector, k, where, fusion)

    async def embed_query(self, question: str) -> np.ndarray:
        """The question's unit vector (with the embedder's query prefix)."""
        return (await self._embed([question], passage=False))[0]

    def similarity(self, vector: np.ndarray, hits: Sequence[Hit]) -> list[float]:
        """Cosine similarity of a question vector to each hit's stored vector (hybrid scores are
        rank-based, so whether anything relevant was found is judged on these)."""
        return [float(vector @ np.asarray(h.vector, dtype=np.float32)) for h in hits]

    async def _embed(self, texts: list[str], passage: bool) -> np.ndarray:
        """Vectors of queries or passages, with the prefixes the embedder was trained with."""
        prefix = PREFIXES.get(self.manifest.embedder, ("", ""))[passage]
        return await self.embedder.embed([prefix + t for t in texts])

    def _filter(self, sources: Sequence[str] | None) -> Filter | None:
        """Only committed documents are searchable (a concurrent ingest's chunks are not yet)."""
        if sources is not None:
            unknown = [s for s in sources if s not in self.manifest.documents]
            if unknown:
                raise InvalidRequestError(f"knowledge base {self.name!r} has no document "
                                          f"{unknown[0]!r}")
            return Filter(doc_ids=[self.manifest.documents[s].doc_id for s in sources])
        if self.manifest.pending:
            return Filter(doc_ids=[d.doc_id for d in self.manifest.documents.values()])
        return None

    # ------------------------------------------------------------------ bookkeeping
    def _set_pending(self, doc_ids: list[str]) -> None:
        self.manifest.pending = doc_ids
        self.manifest.write(self.path)

    def _recover(self) -> None:
        """Delete chunks of an ingest or removal a crash interrupted (ids no document owns)."""
        owned = {d.doc_id for d in self.manifest.documents.values()}
        leftovers = [d for d in self.manifest.pending if d not in owned]
        for doc_id in leftovers:
            self.store.delete_document(doc_id)
        if self.manifest.pending:
            self._set_pending([])


class KnowledgeBases:
    """The knowledge bases under one folder, over one vector database."""

    def __init__(self, db: VectorDatabase, root: Path | None = None) -> None:
        self.db = db
        self.root = root or pagoda_home() / "kb"
        self.root.mkdir(parents=True, exist_ok=True)

    def create(self, name: str, embedder: EmbeddingClient, dim: int, language: str = "en",
               owner: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
               chunk_overlap: int = DEFAULT_CHUNK_OVERLAP) -> KnowledgeBase:
        """A new, empty knowledge base embedding with `embedder` (vectors of `dim`)."""
        path = self._path(name)
        if path.exists():
            raise KnowledgeBaseExistsError(f"knowledge base {name!r} already exists")
        manifest = Manifest(name, embedder.model, dim, language, owner, chunk_size, chunk_overlap)
        self.db.drop(manifest.collection)  # a leftover of a creation that crashed
        store = self.db.create(manifest.collection, dim, language)
        manifest.write(path)
        return KnowledgeBase(manifest, path, store, embedder)

    def manifest(self, name: str, owner: str | None = None) -> Manifest:
        """A knowledge base's manifest; others' knowledge bases look absent (404, not 403)."""
        path = self._path(name)
        if not path.exists():
            raise KnowledgeBaseNotFoundError(self._missing(name, owner))
        manifest = Manifest.read(path)
        if not manifest.visible_to(owner):
            raise KnowledgeBaseNotFoundError(self._missing(name, owner))
        return manifest

    def open(self, name: str, embedder: EmbeddingClient, owner: str | None = None) -> KnowledgeBase:
        manifest = self.manifest(name, owner)
        store = self.db.open(manifest.collection, manifest.dim)
        return KnowledgeBase(manifest, self._path(name), store, embedder)

    def list(self, owner: str | None = None) -> list[Manifest]:
        """The knowledge bases this owner may see, by name."""
        found = [Manifest.read(p) for p in sorted(self.root.glob("*.json"))]
        return [m for m in found if m.visible_to(owner)]

    def delete(self, name: str, owner: str | None = None) -> None:
        manifest = self.manifest(name, owner)
        self.db.drop(manifest.collection)
        self._path(name).unlink()

    def _path(self, name: str) -> Path:
        if not _NAME.fullmatch(name):
            raise InvalidRequestError(
                f"bad knowledge-base name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
        return self.root / f"{name}.json"

    def _missing(self, name: str, owner: str | None) -> str:
        names = ", ".join(m.name for m in self.list(owner)) or "none yet"
        return f"no knowledge base named {name!r} (knowledge bases: {names})"
