"""Stop strings over streamed text: emit what is safe now, hold back what might start a stop."""

from __future__ import annotations

from pagoda.errors import InvalidRequestError


class StopChecker:
    """Cut a text stream at the earliest stop string, without ever emitting part of one.

    Text that could be the start of a stop string is held back until the next chunk decides it;
    with no stop strings every chunk passes straight through.
    """

    def __init__(self, stop: list[str]) -> None:
        if any(not s for s in stop):
            raise InvalidRequestError("stop strings must be non-empty")
        self.stop = list(stop)
        self.stopped = False
        self._held = ""  # tail of the stream that is a prefix of some stop string

    def push(self, chunk: str) -> tuple[str, bool]:
        """Add a chunk; return (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        if not self.stop:
            return chunk, False
        text = self._held + chunk
        hits = [i for s in self.stop if (i := text.find(s)) >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)], True
        keep = self._partial_stop_len(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Release held-back text at the end of the stream (nothing after a stop)."""
        held, self._held = self._held, ""
        return held

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        longest = min(len(text), max(len(s) for s in self.stop) - 1)
        for n in range(longest, 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
