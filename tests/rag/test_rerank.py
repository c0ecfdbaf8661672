"""Reranking by the chat model: yes/no probabilities from first-token logprobs, the fallback on
the reply text, ordering and ties; and with the real SmolLM2 through the engine."""

from __future__ import annotations

import asyncio
import math

import pytest

from pagoda.client import ChatReply
from pagoda.rag.rerank import ChatReranker, judge_messages, yes_probability
from pagoda.rag.store import ChunkMeta, Hit


def hit(text: str, score: float = 0.0) -> Hit:
    return Hit(id=text[:8], doc_id="doc", text=text, score=score, meta=ChunkMeta(source="doc.md"))


class JudgeChat:
    """Says yes (with a given probability) to passages that mention a keyword."""

    model = "judge"

    def __init__(self, keyword: str, with_logprobs: bool = True) -> None:
        self.keyword, self.with_logprobs = keyword, with_logprobs
        self.calls: list[dict] = []

    async def chat(self, messages, *, max_tokens=512, temperature=0.0, stop=None,
                   top_logprobs=0) -> ChatReply:
        self.calls.append({"max_tokens": max_tokens, "top_logprobs": top_logprobs})
        passage = messages[-1]["content"].split("Passage:")[1]
        p = 0.9 if self.keyword in passage.lower() else 0.2
        first = ([("Yes", math.log(p * 0.7)), (" yes", math.log(p * 0.3)),
                  ("No", math.log(1 - p)), ("Maybe", math.log(0.01))]
                 if self.with_logprobs else [])
        return ChatReply("Yes" if p > 0.5 else "No", "length", 30, 1, first)


def test_yes_probability_sums_the_variants_of_each_word():
    first = [("Yes", math.log(0.3)), (" yes", math.log(0.1)), ("NO", math.log(0.2)),
             ("The", math.log(0.3))]
    assert yes_probability(first, "Yes") == pytest.approx(0.4 / 0.6)
    assert yes_probability([("The", -0.1)], "yes, it does") == 1.0  # no yes/no alternative: text
    assert yes_probability([], "No.") == 0.0


def test_rerank_orders_by_the_models_judgement_and_keeps_k():
    hits = [hit("The office opens at nine."), hit("Parental leave lasts 16 weeks."),
            hit("Lunch is at noon."), hit("Leave requests go to HR.")]
    chat = JudgeChat("leave")
    ranked = asyncio.run(ChatReranker(chat).rerank("How long is parental leave?", hits, 3))
    assert [h.text for h in ranked] == ["Parental leave lasts 16 weeks.",
                                        "Leave requests go to HR.", "The office opens at nine."]
    assert ranked[0].score == pytest.approx(0.9) and ranked[2].score == pytest.approx(0.2)
    assert all(c == {"max_tokens": 1, "top_logprobs": 10} for c in chat.calls)
    assert len(chat.calls) == 4  # every candidate judged once


def test_rerank_without_logprobs_falls_back_on_the_text():
    hits = [hit("Lunch is at noon."), hit("Parental leave lasts 16 weeks.")]
    ranked = asyncio.run(ChatReranker(JudgeChat("leave", with_logprobs=False)).rerank(
        "leave?", hits, 2))
    assert [h.score for h in ranked] == [1.0, 0.0]
    assert ranked[0].text.startswith("Parental")


def test_judge_prompt_cuts_long_passages():
    messages = judge_messages("q?", "x" * 10_000)
    assert len(messages[-1]["content"]) < 2200 and messages[0]["role"] == "system"


@pytest.mark.real_model
def test_smollm2_prefers_the_passage_that_answers(smol):
    """The real 135M chat model, through the engine, scores the answering passage higher."""
    from pagoda.client import LocalChat
    from pagoda.infer.engine import AsyncEngine, Engine

    chat = LocalChat(AsyncEngine(Engine(smol.model, smol.tokenizer.eos_ids)), smol.tokenizer,
                     "smollm2", owns_engine=True)
    hits = [hit("The cafeteria serves lunch from 12:00 to 14:00 on weekdays."),
            hit("Employees receive 16 weeks of paid parental leave after the birth or "
                "adoption of a child.")]
    try:
        ranked = asyncio.run(ChatReranker(chat).rerank(
            "How many weeks of paid parental leave do employees get?", hits, 2))
    finally:
        asyncio.run(chat.close())
    assert "parental leave" in ranked[0].text
    assert ranked[0].score > ranked[1].score
