"""Knowledge bases over HTTP: `/v1/knowledge_bases/...` (create, list, show, delete, upload and
remove documents, query).

A knowledge base belongs to the API key that created it (stored as a hash); other keys get 404,
as if it did not exist. The server owns the vector database (Milvus Lite allows one process per
file; a SQLite file may be shared), opened on first use, and the embedding model of
/v1/embeddings. Writes to one knowledge base are serialised by a lock; ingest runs on a worker
thread so streaming chats keep flowing.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from pagoda.errors import DocumentError
from pagoda.rag.databases import open_database
from pagoda.rag.kb import (
    DEFAULT_CHUNK_OVERLAP,
    DEFAULT_CHUNK_SIZE,
    MODES,
    KnowledgeBase,
    KnowledgeBases,
    Manifest,
)
from pagoda.rag.rerank import ChatReranker
from pagoda.rag.store import FUSIONS, LANGUAGES, Hit
from pagoda.serve.embeddings import EmbedderSlot
from pagoda.serve.uploads import check_declared_size, read_upload


class KnowledgeBaseCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    language: str = Field(default="en", pattern="^(" + "|".join(LANGUAGES) + ")$")
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=16, le=2048)
    chunk_overlap: int = Field(default=DEFAULT_CHUNK_OVERLAP, ge=0, le=512)


class KnowledgeBaseQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    query: str
    k: int = Field(default=5, ge=1, le=100)
    mode: str = Field(default="hybrid", pattern="^(" + "|".join(MODES) + ")$")
    fusion: str = Field(default="relative", pattern="^(" + "|".join(FUSIONS) + ")$")
    rerank: bool = False  # reorder the best passages by the chat model's relevance judgement


class KnowledgeBaseService:
    """The server's knowledge bases: one vector database, one open KnowledgeBase per name."""

    def __init__(self, embedder: EmbedderSlot, uri: str | None, root: str | None,
                 max_upload_bytes: int) -> None:
        self.embedder = embedder
        self.uri = uri
        self.root = Path(root) if root else None
        self.max_upload_bytes = max_upload_bytes
        self._kbs: KnowledgeBases | None = None
        self._open: dict[str, KnowledgeBase] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._init = asyncio.Lock()

    async def registry(self) -> KnowledgeBases:
        async with self._init:
            if self._kbs is None:
                db = await asyncio.to_thread(open_database, self.uri)
                self._kbs = KnowledgeBases(db, self.root)
            return self._kbs

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def open(self, name: str, owner: str | None) -> KnowledgeBase:
        """The open knowledge base (read from disk once); 404 for a missing or someone else's."""
        kb = self._open.get(name)
        if kb is None or not kb.manifest.visible_to(owner):
            kbs = await self.registry()
            client = await self.embedder.get()
            kb = self._open[name] = await asyncio.to_thread(kbs.open, name, client, owner)
        return kb

    async def create(self, body: KnowledgeBaseCreate, owner: str | None) -> KnowledgeBase:
        """A new, empty knowledge base embedding with the server's embedding model."""
        kbs = await self.registry()
        client = await self.embedder.get()
        async with self.lock(body.name):
            kb = self._open[body.name] = await asyncio.to_thread(
                kbs.create, body.name, client, client.dimension, body.language, owner,
                body.chunk_size, body.chunk_overlap)
        return kb

    async def delete(self, name: str, owner: str | None) -> None:
        kbs = await self.registry()
        async with self.lock(name):
            await asyncio.to_thread(kbs.delete, name, owner)
            self._open.pop(name, None)

    async def close(self) -> None:
        if self._kbs is not None:
            self._kbs.db.close()


def owner_of(guard: Any, request: Request) -> str | None:
    """Who owns what this request creates: a hash of its API key (None when auth is off)."""
    key = guard.key_of(request)
    return hashlib.sha256(key.encode()).hexdigest()[:32] if key else None


def build_kb_router(service: KnowledgeBaseService, guard: Any, deps: list[Any],
                    reranker: Callable[[], ChatReranker]) -> APIRouter:
    router = APIRouter(prefix="/v1/knowledge_bases", dependencies=deps)

    @router.get("")
    async def list_kbs(request: Request) -> dict[str, Any]:
        """The knowledge bases of this key."""
        kbs = await service.registry()
        return {"object": "list", "data": [_card(m) for m in kbs.list(owner_of(guard, request))]}

    @router.post("")
    async def create_kb(body: KnowledgeBaseCreate, request: Request) -> dict[str, Any]:
        """A new, empty knowledge base embedding with the server's embedding model."""
        return _card((await service.create(body, owner_of(guard, request))).manifest)

    @router.get("/{name}")
    async def show_kb(name: str, request: Request) -> dict[str, Any]:
        """One knowledge base with its documents."""
        kbs = await service.registry()
        manifest = kbs.manifest(name, owner_of(guard, request))
        docs = [{"source": d.source, "format": d.format, "chunks": d.chunks,
                 "sha256": d.sha256, "added": int(d.added)}
                for d in sorted(manifest.documents.values(), key=lambda d: d.added)]
        return {**_card(manifest), "documents": docs}

    @router.delete("/{name}")
    async def delete_kb(name: str, request: Request) -> dict[str, Any]:
        await service.delete(name, owner_of(guard, request))
        return {"id": name, "object": "knowledge_base.deleted", "deleted": True}

    @router.post("/{name}/documents")
    async def upload(name: str, request: Request, files: list[UploadFile]) -> dict[str, Any]:
        """Add or update documents (multipart `files`); unreadable ones are reported, not stored."""
        check_declared_size(request, len(files), service.max_upload_bytes)
        kb = await service.open(name, owner_of(guard, request))
        done, failed = [], []
        async with service.lock(name):
            for upload_file in files:
                data = await read_upload(upload_file, service.max_upload_bytes)
                source = upload_file.filename or "upload"
                try:
                    result = await asyncio.to_thread(_add_blocking, kb, data, source)
                except DocumentError as exc:
                    failed.append({"source": source, "error": str(exc)})
                    continue
                done.append({"source": result.source, "status": result.status,
                             "chunks": result.chunks})
        return {"object": "list", "data": done, "errors": failed}

    @router.delete("/{name}/documents/{source:path}")
    async def remove_document(name: str, source: str, request: Request) -> dict[str, Any]:
        kb = await service.open(name, owner_of(guard, request))
        async with service.lock(name):
            record = await asyncio.to_thread(kb.remove, source)
        return {"id": record.source, "object": "knowledge_base.document.deleted",
                "deleted": True, "chunks": record.chunks}

    @router.post("/{name}/query")
    async def query(name: str, body: KnowledgeBaseQuery, request: Request) -> dict[str, Any]:
        """The passages most relevant to `query`, best first."""
        kb = await service.open(name, owner_of(guard, request))
        hits = await kb.query(body.query, body.k, body.mode, fusion=body.fusion,
                              reranker=reranker() if body.rerank else None)
        return {"object": "list", "data": [hit_dict(h) for h in hits]}

    return router


def _add_blocking(kb: KnowledgeBase, data: bytes, source: str):
    """Ingest on a worker thread (parsing, splitting and the store's writes block)."""
    return asyncio.run(kb.add(data, source))


def _card(m: Manifest) -> dict[str, Any]:
    return {"id": m.name, "object": "knowledge_base", "embedder": m.embedder, "dim": m.dim,
            "language": m.language, "documents": len(m.documents),
            "chunks": sum(d.chunks for d in m.documents.values()), "created": int(m.created)}


def hit_dict(hit: Hit) -> dict[str, Any]:
    return {"source": hit.meta.source, "page": hit.meta.page, "headings": list(hit.meta.headings),
            "text": hit.text, "score": hit.score}
