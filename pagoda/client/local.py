"""In-process clients: the chat model on `infer.AsyncEngine`, the embedder on `AsyncEmbedder`."""

from __future__ import annotations

import numpy as np

from pagoda.client.base import ChatReply
from pagoda.infer.completion import SequenceText
from pagoda.infer.embed import EmbeddingEngine
from pagoda.infer.embed_worker import AsyncEmbedder
from pagoda.infer.engine import AsyncEngine, Engine
from pagoda.infer.sampling import SamplingParams
from pagoda.tokenizer import Tokenizer
from pagoda.tokenizer.chat import encode_chat


class LocalChat:
    """Chat through an engine in this process (the server's own, or one built by `load`)."""

    def __init__(self, engine: AsyncEngine, tokenizer: Tokenizer, model: str,
                 owns_engine: bool = False) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model = model
        self._owns_engine = owns_engine

    @classmethod
    def load(cls, name: str) -> LocalChat:
        """Load a chat model (pulled on first use) with an engine of its own."""
        from pagoda.hub.loader import load_model

        loaded = load_model(name)
        engine = AsyncEngine(Engine(loaded.model, loaded.tokenizer.eos_ids))
        return cls(engine, loaded.tokenizer, name, owns_engine=True)

    async def chat(self, messages: list[dict[str, str]], *, max_tokens: int = 512,
                   temperature: float = 0.0, stop: list[str] | None = None,
                   top_logprobs: int = 0) -> ChatReply:
        prompt = encode_chat(self.tokenizer, messages, add_generation_prompt=True).ids
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens,
                                logprobs=top_logprobs > 0, top_logprobs=top_logprobs).validated()
        text = SequenceText(self.tokenizer, stop or [])
        pieces: list[str] = []
        first: list[tuple[str, float]] = []
        produced, reason = 0, "length"
        stream = self.engine.generate(prompt, params)
        try:
            async for out in stream:
                if produced == 0 and top_logprobs:
                    first = [(self.tokenizer.decode([t]), lp) for t, lp in out.top_logprobs]
                produced += 1
                piece, hit = text.push(out.token_id, last=out.finish_reason is not None)
                pieces.append(piece)
                if hit or out.finish_reason:
                    reason = "stop" if hit else out.finish_reason
                    break
        finally:
            await stream.aclose()  # stops the generation if a stop string ended it early
        return ChatReply("".join(pieces), reason, len(prompt), produced, first)

    async def close(self) -> None:
        if self._owns_engine:
            self.engine.shutdown()


class LocalEmbeddings:
    """Embeddings from an encoder in this process, batched on its worker thread."""

    def __init__(self, worker: AsyncEmbedder, owns_worker: bool = False) -> None:
        self.worker = worker
        self.model = worker.engine.name
        self._owns_worker = owns_worker

    @classmethod
    def load(cls, name: str = "minilm-l6") -> LocalEmbeddings:
        """Load an embedding model (pulled on first use) with a worker of its own."""
        from pagoda.hub.loader import load_model

        loaded = load_model(name)
        engine = EmbeddingEngine(loaded.model, loaded.tokenizer, name, loaded.max_tokens)
        return cls(AsyncEmbedder(engine), owns_worker=True)

    @property
    def dimension(self) -> int:
        return self.worker.engine.dimension

    @property
    def max_tokens(self) -> int:
        return self.worker.engine.max_tokens

    def count_tokens(self, text: str) -> int:
        return self.worker.engine.count_tokens(text)

    async def embed(self, texts: list[str]) -> np.ndarray:
        return await self.worker.embed(texts)

    async def close(self) -> None:
        if self._owns_worker:
            self.worker.shutdown()
