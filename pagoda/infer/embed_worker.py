"""`AsyncEmbedder`: embeddings for asyncio callers, computed on one background thread.

Requests that arrive while the worker is busy wait in a queue and are merged into one batch
when it frees up (dynamic batching, as embedding servers do), so many small requests cost about
what one large one does and the event loop never runs the encoder itself.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future

import numpy as np

from pagoda.infer.embed import EmbeddingEngine

_Job = tuple[list[str], Future]


class AsyncEmbedder:
    """Runs `EmbeddingEngine.embed` on a worker thread, batching queued requests together."""

    def __init__(self, engine: EmbeddingEngine, max_batch_texts: int = 256) -> None:
        self.engine = engine
        self.max_batch_texts = max_batch_texts
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pagoda-embed", daemon=True)
        self._thread.start()

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Unit vectors (len(texts), dimension) in input order; errors as `engine.embed`'s."""
        future: Future = Future()
        self._jobs.put((list(texts), future))
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Stop the worker once the jobs already queued are done, and wait for it: a thread
        still inside torch when the interpreter exits aborts the process."""
        self._jobs.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            batch = [job]
            size = len(job[0])
            while size < self.max_batch_texts:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:  # shut down after this batch
                    self._jobs.put(None)
                    break
                batch.append(nxt)
                size += len(nxt[0])
            # Running futures can no longer be cancelled under the worker; those whose caller
            # already went away (a cancelled request) are dropped instead of embedded.
            batch = [(texts, f) for texts, f in batch if f.set_running_or_notify_cancel()]
            if batch:
                self._embed(batch)

    def _embed(self, batch: list[_Job]) -> None:
        """One encoder call for the whole batch; if it fails (one request's bad input), each
        request runs alone so only the bad one gets the error."""
        try:
            vectors = self.engine.embed([t for texts, _ in batch for t in texts])
        except Exception:  # noqa: BLE001 - re-raised per request below
            if len(batch) == 1:
                return _settle(batch[0][1], self.engine.embed, batch[0][0])
            for texts, future in batch:
                _settle(future, self.engine.embed, texts)
            return
        start = 0
        for texts, future in batch:
            future.set_result(vectors[start:start + len(texts)])
            start += len(texts)


def _settle(future: Future, fn, texts: list[str]) -> None:
    """Resolve future with fn(texts) or with the exception it raises."""
    try:
        future.set_result(fn(texts))
    except Exception as exc:  # noqa: BLE001 - handed to the awaiting request
        future.set_exception(exc)
