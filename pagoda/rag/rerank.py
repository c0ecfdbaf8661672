"""Reranking by the chat model: pointwise relevance scores when no cross-encoder is available.

Each retrieved passage is shown to the chat model with the question, and the model is asked
whether the passage helps answer it. The score is the probability of "yes" against "no" in the
model's distribution over its first answer token (read from `top_logprobs`, as in the pointwise
yes/no rerankers of RankGPT and monoT5), which ranks far finer than the yes/no text itself;
servers that return no logprobs fall back to the text (1.0 for yes, 0.0 otherwise). All
passages are scored concurrently, so the engine batches them into the same forward passes.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import replace

from pagoda.client import ChatClient
from pagoda.rag.store import Hit

SYSTEM = ("You judge search results. Given a question and a passage, reply with one word: "
          "yes if the passage contains information that answers the question, otherwise no.")
TOP_LOGPROBS = 10  # alternatives read for the first token: yes/no variants are always among them
MAX_PASSAGE_CHARS = 2000  # a chunk is ~128 tokens; longer texts are cut before scoring


def judge_messages(question: str, passage: str) -> list[dict[str, str]]:
    """The conversation that asks the model whether `passage` answers `question`."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Question: {question}\n\n"
                                        f"Passage: {passage[:MAX_PASSAGE_CHARS]}\n\n"
                                        "Does the passage answer the question? (yes/no)"}]


def yes_probability(first_token: Sequence[tuple[str, float]], text: str) -> float:
    """P(yes) / (P(yes) + P(no)) over the first token's alternatives ("Yes", " yes", ...);
    from the reply text when neither word is among them."""
    mass = {"yes": 0.0, "no": 0.0}
    for token, logprob in first_token:
        word = token.strip().lower()
        if word in mass:
            mass[word] += math.exp(logprob)
    total = mass["yes"] + mass["no"]
    if total > 0:
        return mass["yes"] / total
    return 1.0 if text.strip().lower().startswith("yes") else 0.0


class ChatReranker:
    """Reorders hits by the chat model's judgement of each one's relevance."""

    def __init__(self, chat: ChatClient) -> None:
        self.chat = chat

    async def score(self, question: str, passage: str) -> float:
        """The model's probability that `passage` answers `question`."""
        reply = await self.chat.chat(judge_messages(question, passage), max_tokens=1,
                                     temperature=0.0, top_logprobs=TOP_LOGPROBS)
        return yes_probability(reply.first_token_logprobs, reply.text)

    async def rerank(self, question: str, hits: Sequence[Hit], k: int) -> list[Hit]:
        """The k hits the model finds most relevant, best first, each scored by P(yes); ties
        keep the retrieval order."""
        scores = await asyncio.gather(*(self.score(question, h.text) for h in hits))
        order = sorted(range(len(hits)), key=lambda i: (-scores[i], i))
        return [replace(hits[i], score=scores[i]) for i in order[:k]]
