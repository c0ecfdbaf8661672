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
from pagoda.rag.store import Hit

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


def grounded_messages(question: str, hits: list[Hit]) -> list[dict[str, str]]:
    """The chat messages: instructions, then the numbered passages and the question."""
    passages = "\n\n".join(f"[{n}] ({_where(h)})\n{h.text}" for n, h in enumerate(hits, 1))
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Passages:\n\n{passages}\n\nQuestion: {question}"}]


async def ask(kb: KnowledgeBase, chat: ChatClient, question: str, k: int = 4,
              min_relevance: float = MIN_RELEVANCE, max_tokens: int = 256) -> Answer:
    """Answer `question` from the knowledge base, with citations."""
    hits = await kb.query(question, k)
    relevance = await kb.relevance(question, hits) if hits else []
    if not hits or max(relevance) < min_relevance:
        return Answer(NOT_FOUND, [], found=False)
    reply = await chat.chat(grounded_messages(question, hits), max_tokens=max_tokens)
    cited = sorted({int(n) for n in _CITE.findall(reply.text) if 1 <= int(n) <= len(hits)})
    numbers = cited or list(range(1, len(hits) + 1))
    citations = [Citation(n, hits[n - 1].meta.source, hits[n - 1].meta.page,
                          hits[n - 1].meta.headings, hits[n - 1].text, relevance[n - 1])
                 for n in numbers]
    return Answer(reply.text.strip(), citations, found=True)


def _where(hit: Hit) -> str:
    """Where a passage is from, as the prompt shows it: source, page, headings."""
    parts = [hit.meta.source]
    if hit.meta.page is not None:
        parts.append(f"page {hit.meta.page}")
    if hit.meta.headings:
        parts.append(" > ".join(hit.meta.headings))
    return ", ".join(parts)
