"""`pagoda kb ...`: knowledge bases from the command line (create, add, list, show, delete,
rm-doc, query, ask). Vectors go to Milvus Lite under $PAGODA_HOME unless PAGODA_VECTOR_STORE
names another database (`sqlite:///path/kb.sqlite`, a Milvus server URL, ...; see
`pagoda.rag.databases`) or, as before, PAGODA_MILVUS_URI names a Milvus one (with
PAGODA_MILVUS_TOKEN if it needs one)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from contextlib import closing
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from pagoda.cli import add_verb
from pagoda.client import ChatClient, HTTPChat, LocalChat, LocalEmbeddings
from pagoda.errors import DocumentError
from pagoda.rag.answer import ask
from pagoda.rag.databases import open_database
from pagoda.rag.kb import (
    DEFAULT_CHUNK_OVERLAP,
    DEFAULT_CHUNK_SIZE,
    MODES,
    RERANK_CANDIDATES,
    KnowledgeBase,
    KnowledgeBases,
)
from pagoda.rag.rerank import ChatReranker
from pagoda.rag.store import FUSIONS, LANGUAGES, VectorDatabase

DEFAULT_EMBEDDER = "minilm-l6"
DEFAULT_CHAT = "smollm2-135m-instruct"


def register(subparsers: argparse._SubParsersAction) -> None:
    kb = subparsers.add_parser(
        "kb", help="knowledge bases: add documents, search them, ask questions with citations",
        description="Knowledge bases (RAG): documents are split, embedded and stored; questions "
        "retrieve passages (hybrid BM25 + vectors) and get answers citing them.",
        epilog="example:\n  pagoda kb create docs && pagoda kb add docs README.md docs/*.md\n"
        "  pagoda kb ask docs \"How do I start the server?\"\n"
        "every command takes --json (machine-readable output) and --help",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    kb.set_defaults(handler=lambda _: kb.print_help() or 2, debug=False)
    sub = kb.add_subparsers(title="commands", metavar="COMMAND")

    p = add_verb(sub, "create", "create an empty knowledge base",
                 "pagoda kb create hr-policies --language en", cmd_create)
    p.add_argument("name")
    p.add_argument("--embedder", default=DEFAULT_EMBEDDER,
                   help=f"embedding model (default {DEFAULT_EMBEDDER}, English; pulled on first use)")
    p.add_argument("--language", choices=LANGUAGES, default="en",
                   help="keyword-search analyzer: en, or zh (jieba) for Chinese")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                   help=f"tokens per chunk ({DEFAULT_CHUNK_SIZE})")
    p.add_argument("--chunk-overlap", type=int, default=DEFAULT_CHUNK_OVERLAP,
                   help=f"tokens of overlap ({DEFAULT_CHUNK_OVERLAP})")

    p = add_verb(sub, "add", "add (or update) documents: txt, md, html, pdf, docx, csv, json",
                 "pagoda kb add hr-policies handbook.pdf faq.md", cmd_add)
    p.add_argument("name")
    p.add_argument("paths", nargs="+", metavar="PATH")

    add_verb(sub, "list", "list knowledge bases", "pagoda kb list --json", cmd_list)

    p = add_verb(sub, "show", "show a knowledge base and its documents",
                 "pagoda kb show hr-policies", cmd_show)
    p.add_argument("name")

    p = add_verb(sub, "delete", "delete a knowledge base and everything in it",
                 "pagoda kb delete hr-policies", cmd_delete)
    p.add_argument("name")

    p = add_verb(sub, "rm-doc", "remove one document (as it was added) from a knowledge base",
                 "pagoda kb rm-doc hr-policies faq.md", cmd_rm_doc)
    p.add_argument("name")
    p.add_argument("source", help="the document's path exactly as it was added")

    p = add_verb(sub, "query", "the passages most relevant to a question",
                 "pagoda kb query hr-policies \"parental leave\" --k 3 --json", cmd_query)
    p.add_argument("name")
    p.add_argument("question")
    p.add_argument("--k", type=int, default=5, help="passages to return (5)")
    p.add_argument("--mode", choices=MODES, default="hybrid")
    p.add_argument("--fusion", choices=FUSIONS, default="relative",
                   help="how hybrid search merges BM25 and vector rankings: relative score "
                        "fusion (default) or reciprocal-rank fusion")
    _chat_arguments(p, "reranking (with --rerank)")

    p = add_verb(sub, "ask", "answer a question from a knowledge base, with citations",
                 "pagoda kb ask hr-policies \"How long is parental leave?\" --rerank", cmd_ask)
    p.add_argument("name")
    p.add_argument("question")
    p.add_argument("--k", type=int, default=4, help="passages given to the model (4)")
    _chat_arguments(p, "answering")
    p.add_argument("--max-tokens", type=int, default=256)


def _chat_arguments(p: argparse.ArgumentParser, purpose: str) -> None:
    """--rerank and the chat model options (in-process model or a remote endpoint)."""
    p.add_argument("--rerank", action="store_true",
                   help=f"let the chat model reorder the best {RERANK_CANDIDATES} passages by "
                        "relevance (slower; pointwise yes/no scoring)")
    p.add_argument("--model", default=None,
                   help=f"chat model for {purpose} (default {DEFAULT_CHAT} in-process, or the "
                        "remote model name with --base-url)")
    p.add_argument("--base-url", default=None,
                   help="an OpenAI-compatible endpoint, e.g. https://api.deepseek.com/v1")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="key for --base-url (default $OPENAI_API_KEY)")


# ------------------------------------------------------------------------------ plumbing
def _database() -> VectorDatabase:
    uri = os.environ.get("PAGODA_VECTOR_STORE") or os.environ.get("PAGODA_MILVUS_URI") or None
    return open_database(uri, token=os.environ.get("PAGODA_MILVUS_TOKEN", ""))


def _with_kb(name: str, work: Callable[[KnowledgeBase], Awaitable[Any]]) -> Any:
    """Open the knowledge base with its own embedder, run `work` on it, close everything."""
    with closing(_database()) as db:
        kbs = KnowledgeBases(db)
        embedder = LocalEmbeddings.load(kbs.manifest(name).embedder)

        async def go() -> Any:
            try:
                return await work(kbs.open(name, embedder))
            finally:
                await embedder.close()

        return asyncio.run(go())


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


# ------------------------------------------------------------------------------ commands
def cmd_create(args: argparse.Namespace) -> None:
    with closing(_database()) as db:
        embedder = LocalEmbeddings.load(args.embedder)
        try:
            kb = KnowledgeBases(db).create(args.name, embedder, embedder.dimension, args.language,
                                           chunk_size=args.chunk_size,
                                           chunk_overlap=args.chunk_overlap)
        finally:
            asyncio.run(embedder.close())
    m = kb.manifest
    if args.json:
        print(json.dumps({"name": m.name, "embedder": m.embedder, "dim": m.dim,
                          "language": m.language}))
    else:
        print(f"created knowledge base {m.name!r} ({m.embedder}, {m.dim}-dim, {m.language})")


def cmd_add(args: argparse.Namespace) -> int:
    async def work(kb: KnowledgeBase) -> tuple[list[dict], list[dict]]:
        done, failed = [], []
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, disable=args.json, transient=True) as bar:
            for path in args.paths:
                task = bar.add_task(str(path), total=None)
                try:
                    result = await kb.add_file(path, lambda n, total, t=task: bar.update(
                        t, completed=n, total=total))
                except DocumentError as exc:  # skip unreadable files, keep going
                    failed.append({"source": str(path), "error": str(exc)})
                    continue
                finally:
                    bar.remove_task(task)
                done.append({"source": result.source, "status": result.status,
                             "chunks": result.chunks})
        return done, failed

    done, failed = _with_kb(args.name, work)
    if args.json:
        print(json.dumps({"documents": done, "errors": failed}, ensure_ascii=False))
    else:
        for d in done:
            print(f"{d['status']:9} {d['source']} ({d['chunks']} chunks)")
        for f in failed:
            print(f"skipped   {f['error']}")
    return 1 if failed else 0


def cmd_list(args: argparse.Namespace) -> None:
    with closing(_database()) as db:
        manifests = KnowledgeBases(db).list()
    rows = [{"name": m.name, "embedder": m.embedder, "language": m.language,
             "documents": len(m.documents), "chunks": sum(d.chunks for d in m.documents.values())}
            for m in manifests]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return
    table = Table(title="Knowledge bases")
    for column in ("name", "embedder", "language", "documents", "chunks"):
        table.add_column(column)
    for r in rows:
        table.add_row(*(str(r[c]) for c in ("name", "embedder", "language", "documents", "chunks")))
    Console().print(table)


def cmd_show(args: argparse.Namespace) -> None:
    with closing(_database()) as db:
        m = KnowledgeBases(db).manifest(args.name)
    docs = [{"source": d.source, "format": d.format, "chunks": d.chunks, "sha256": d.sha256,
             "added": _when(d.added)} for d in sorted(m.documents.values(), key=lambda d: d.added)]
    if args.json:
        print(json.dumps({"name": m.name, "embedder": m.embedder, "dim": m.dim,
                          "language": m.language, "chunk_size": m.chunk_size,
                          "chunk_overlap": m.chunk_overlap, "documents": docs},
                         ensure_ascii=False))
        return
    print(f"{m.name}: {m.embedder} ({m.dim}-dim), language {m.language}, chunks of "
          f"{m.chunk_size} tokens with {m.chunk_overlap} overlap, created {_when(m.created)}")
    table = Table(title=f"{len(docs)} documents")
    for column in ("source", "format", "chunks", "added"):
        table.add_column(column)
    for d in docs:
        table.add_row(d["source"], d["format"], str(d["chunks"]), d["added"])
    Console().print(table)


def cmd_delete(args: argparse.Namespace) -> None:
    with closing(_database()) as db:
        KnowledgeBases(db).delete(args.name)
    print(json.dumps({"deleted": args.name}) if args.json else f"deleted {args.name!r}")


def cmd_rm_doc(args: argparse.Namespace) -> None:
    async def work(kb: KnowledgeBase):
        return kb.remove(args.source)

    record = _with_kb(args.name, work)
    if args.json:
        print(json.dumps({"removed": record.source, "chunks": record.chunks}, ensure_ascii=False))
    else:
        print(f"removed {record.source} ({record.chunks} chunks)")


def _chat_client(args: argparse.Namespace) -> ChatClient:
    if args.base_url:
        return HTTPChat(args.base_url, args.model or "deepseek-chat", args.api_key)
    return LocalChat.load(args.model or DEFAULT_CHAT)


def cmd_query(args: argparse.Namespace) -> None:
    async def work(kb: KnowledgeBase):
        chat = _chat_client(args) if args.rerank else None
        try:
            return await kb.query(args.question, args.k, args.mode, fusion=args.fusion,
                                  reranker=ChatReranker(chat) if chat else None)
        finally:
            if chat is not None:
                await chat.close()

    hits = _with_kb(args.name, work)
    rows = [{"source": h.meta.source, "page": h.meta.page, "headings": list(h.meta.headings),
             "text": h.text, "score": h.score} for h in hits]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return
    for i, r in enumerate(rows, 1):
        page = f", page {r['page']}" if r["page"] is not None else ""
        print(f"[{i}] {r['source']}{page}  (score {r['score']:.4f})\n{r['text']}\n")


def cmd_ask(args: argparse.Namespace) -> None:
    chat = _chat_client(args)

    async def work(kb: KnowledgeBase):
        try:
            return await ask(kb, chat, args.question, args.k, max_tokens=args.max_tokens,
                             rerank=args.rerank)
        finally:
            await chat.close()

    answer = _with_kb(args.name, work)
    citations = [{"n": c.n, "source": c.source, "page": c.page, "text": c.text,
                  "score": c.score} for c in answer.citations]
    if args.json:
        print(json.dumps({"answer": answer.text, "citations": citations, "found": answer.found},
                         ensure_ascii=False))
        return
    print(answer.text)
    for c in citations:
        page = f", page {c['page']}" if c["page"] is not None else ""
        print(f"  [{c['n']}] {c['source']}{page}: {c['text'][:120]!r}")
