"""Grounded answers: retrieved passages, numbered, go into the prompt with the question; the
model answers from them only and cites them as [n]; the answer comes back with its sources.

When even the best passage is not similar enough to the question (cosine similarity of the
embeddings below `min_relevance`), the knowledge base does not hold the answer and we say so
without asking the model — small models asked anyway tend to answer from their own memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pagoda.client import ChatClient
from pagoda.rag.kb import KnowledgeBase
from pagoda.rag.rerank import ChatReranker

NOT_FOUND = "I don't know: the knowledge base does not contain this."
SYSTEM = ("You answer questions using only the numbered passages from a knowledge base. "
          "Cite the passages you use with their numbers in square brackets, like [1] or [2][3]. "
          f"If the passages do not contain the answer, reply exactly: {NOT_FOUND}")
MIN_RELEVANCE = 0.25  # all-MiniLM cosine; unrelated English sentences score about 0-0.15
_CITE = re.compile(r"\[(\d+)\]")


@dataclass
class Citation:
    """A passage an answer rests on."""

    n: int  # its number in the prompt: the answer cites it as [n]
    source: str
    page: int | None
    headings: tuple[str, ...]
    text: str
    score: float


@dataclass
class Answer:
    text: str
    citations: list[Citation]  # the passages the answer cites (all given, if it cites none)
    found: bool  # False: nothing relevant was retrieved and the model was not asked


def grounded_messages(question: str, passages: list[Citation],
                      history: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    """The chat messages: instructions, earlier turns, then the numbered passages and the
    question."""
    text = "\n\n".join(f"[{p.n}] ({_where(p)})\n{p.text}" for p in passages)
    return [{"role": "system", "content": SYSTEM}, *(history or []),
            {"role": "user", "content": f"Passages:\n\n{text}\n\nQuestion: {question}"}]


async def retrieve(kb: KnowledgeBase, question: str, k: int = 4,
                   min_relevance: float = MIN_RELEVANCE,
                   reranker: ChatReranker | None = None) -> list[Citation]:
    """The numbered passages to answer from; empty when none is relevant enough."""
    vector = await kb.embed_query(question)
    hits = await kb.query(question, k, vector=vector, reranker=reranker)
    relevance = kb.similarity(vector, hits)
    if not hits or max(relevance) < min_relevance:
        return []
    return [Citation(n, h.meta.source, h.meta.page, h.meta.headings, h.text, score)
            for n, (h, score) in enumerate(zip(hits, relevance, strict=True), 1)]


def cited(text: str, passages: list[Citation]) -> list[Citation]:
    """The passages an answer cites as [n] (all of them if it cites none)."""
    numbers = {int(n) for n in _CITE.findall(text)}
    return [p for p in passages if p.n in numbers] or passages


async def ask(kb: KnowledgeBase, chat: ChatClient, question: str, k: int = 4,
              min_relevance: float = MIN_RELEVANCE, max_tokens: int = 256,
              rerank: bool = False) -> Answer:
    """Answer `question` from the knowledge base, with citations; with `rerank`, the chat
    model first reorders the retrieved passages by relevance."""
    reranker = ChatReranker(chat) if rerank else None
    passages = await retrieve(kb, question, k, min_relevance, reranker)
    if not passages:
        return Answer(NOT_FOUND, [], found=False)
    reply = await chat.chat(grounded_messages(question, passages), max_tokens=max_tokens)
    return Answer(reply.text.strip(), cited(reply.text, passages), found=True)


def _where(passage: Citation) -> str:
    """Where a passage is from, as the prompt shows it: source, page, headings."""
    parts = [passage.source]
    if passage.page is not None:
        parts.append(f"page {passage.page}")
    if passage.headings:
        parts.append(" > ".join(passage.headings))
    return ", ".join(parts)
