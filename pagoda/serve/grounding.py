"""Chat completions grounded on a knowledge base (`"knowledge_base": NAME`, a Pagoda extension).

The last user message is the question: the knowledge base's most relevant passages replace it
as a numbered context with the instruction to answer only from them and cite [n]; earlier turns
are kept. The response carries `citations` (an extra field the OpenAI SDK ignores; in a stream,
on the first chunk). When nothing relevant is found the model is not asked: the answer is
"I don't know: the knowledge base does not contain this." with no citations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from pagoda.errors import InvalidRequestError
from pagoda.rag.answer import Citation, grounded_messages, retrieve
from pagoda.serve.errors import with_param
from pagoda.serve.kb_routes import owner_of
from pagoda.tokenizer.chat import content_text


@dataclass
class Grounding:
    messages: list[dict[str, Any]]  # what to send the model (unchanged if nothing was found)
    citations: list[Citation]  # numbered passages; empty: nothing relevant, do not ask the model


async def ground(state: Any, name: str, messages: list[dict[str, Any]],
                 request: Request, rerank: bool = False) -> Grounding:
    """Retrieve passages for the last user message (reranked by the model with `rerank`) and
    build the grounded conversation."""
    kb = await state.knowledge.open(name, owner_of(state.guard, request))
    last = next((i for i in range(len(messages) - 1, -1, -1)
                 if messages[i]["role"] == "user"), None)
    question = content_text(messages[last].get("content"), last) if last is not None else ""
    if not question.strip():
        raise with_param(InvalidRequestError(
            "a chat grounded on a knowledge base needs a user message with the question"),
            "messages")
    passages = await retrieve(kb, question, reranker=state.reranker() if rerank else None)
    if not passages:
        return Grounding(messages, [])
    history = [m for m in messages[:last] if m["role"] in ("user", "assistant")]
    return Grounding(grounded_messages(question, passages, history), passages)


def citation_dicts(citations: list[Citation]) -> list[dict[str, Any]]:
    return [{"index": c.n, "source": c.source, "page": c.page, "headings": list(c.headings),
             "text": c.text, "score": round(c.score, 4)} for c in citations]
