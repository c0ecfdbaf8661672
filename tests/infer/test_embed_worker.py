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


async def occupy(worker: AsyncEmbedder, engine: FakeEngine) -> asyncio.Task:
    """Start a request for ["a"] that holds the worker (blocked on the gate) until it opens."""
    engine.gate.clear()
    task = asyncio.ensure_future(worker.embed(["a"]))
    await asyncio.sleep(0.05)
    return task


def test_waiting_requests_are_merged_into_one_batch():
    engine = FakeEngine()
    worker = AsyncEmbedder(engine)

    async def run():
        first = await occupy(worker, engine)  # the rest queue up behind it
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
        blocker = await occupy(worker, engine)
        good = asyncio.ensure_future(worker.embed(["ok"]))
        bad = asyncio.ensure_future(worker.embed([""]))
        await asyncio.sleep(0.05)
        engine.gate.set()
        await blocker
        await asyncio.wait([good, bad])  # bad settles just after good (it is retried alone)
        return good.result(), bad

    good, bad = asyncio.run(run())
    np.testing.assert_array_equal(good, [[2, 1]])
    with pytest.raises(InvalidRequestError):
        bad.result()
    worker.shutdown()


def test_cancelled_requests_do_not_stop_the_worker():
    """A client that goes away while its request is queued or being embedded: the queued one
    is dropped, the running one finishes unseen, and later requests are still served."""
    engine = FakeEngine()
    worker = AsyncEmbedder(engine)

    async def run():
        running = await occupy(worker, engine)
        queued = asyncio.ensure_future(worker.embed(["bb"]))
        await asyncio.sleep(0.05)
        running.cancel()
        queued.cancel()
        await asyncio.sleep(0.05)
        engine.gate.set()
        return await asyncio.wait_for(worker.embed(["ccc"]), timeout=10)

    np.testing.assert_array_equal(asyncio.run(run()), [[3, 1]])
    worker.shutdown()
    assert engine.batches == [1, 1]  # "a" was embedded, "bb" never was
