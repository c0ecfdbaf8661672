"""AsyncEmbedder: concurrent requests share batches, keep their order, and fail alone."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from pagoda.errors import InvalidRequestError
from pagoda.infer.embed_worker import AsyncEmbedder


class FakeEngine:
    """Embeds text i as [len(text), 1]; records batch sizes; blocks on `gate` while asked."""

    name = "fake"

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def embed(self, texts):
        self.gate.wait()
        if any(not t for t in texts):
            raise InvalidRequestError("empty text")
        self.batches.append(len(texts))
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)


def test_waiting_requests_are_merged_into_one_batch():
    engine = FakeEngine()
    worker = AsyncEmbedder(engine)

    async def run():
        engine.gate.clear()  # the first request blocks the worker; the rest queue up
        first = asyncio.ensure_future(worker.embed(["a"]))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(worker.embed(["x" * n] * n)) for n in range(1, 5)]
        await asyncio.sleep(0.05)
        engine.gate.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(run())
    worker.shutdown()
    assert engine.batches == [1, 1 + 2 + 3 + 4]
    np.testing.assert_array_equal(first, [[1, 1]])
    for n, got in enumerate(rest, start=1):
        np.testing.assert_array_equal(got, [[n, 1]] * n)


def test_a_bad_request_fails_alone():
    engine = FakeEngine()
    worker = AsyncEmbedder(engine)

    async def run():
        engine.gate.clear()
        blocker = asyncio.ensure_future(worker.embed(["a"]))
        await asyncio.sleep(0.05)
        good = asyncio.ensure_future(worker.embed(["ok"]))
        bad = asyncio.ensure_future(worker.embed([""]))
        await asyncio.sleep(0.05)
        engine.gate.set()
        await blocker
        return await good, bad

    good, bad = asyncio.run(run())
    np.testing.assert_array_equal(good, [[2, 1]])
    with pytest.raises(InvalidRequestError):
        bad.result()
    worker.shutdown()
