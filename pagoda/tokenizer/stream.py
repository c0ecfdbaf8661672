"""Incremental detokenization: text chunks as tokens arrive, never a broken UTF-8 character.

Decoding one token at a time is wrong (a byte-level token can hold half a character; SentencePiece
drops the leading space of a lone token), and decoding everything each step is quadratic. As in
vLLM/TGI we decode a small window: the tokens already shown (`prefix`) plus the new ones, and emit
what the new ones added.
"""

from __future__ import annotations

from pagoda.tokenizer.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"  # what decoding yields for an incomplete UTF-8 sequence


class StreamDecoder:
    """Turns a stream of token ids into text chunks whose concatenation is `decode(all_ids)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []  # only the window: already-emitted context + pending tokens
        self._prefix_end = 0  # ids[:prefix_end] were emitted and serve as context only

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is still partial)."""
        self._ids.append(token_id)
        prefix, text = self._decode_window()
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT):
            return ""
        return self._advance(text[len(prefix) :])

    def flush(self) -> str:
        """Return whatever is still held back (e.g. a truncated character at the end of a stream)."""
        prefix, text = self._decode_window()
        return self._advance(text[len(prefix) :])

    def _advance(self, chunk: str) -> str:
        """Mark pending tokens as emitted: they become the context; older ones are dropped."""
        self._ids = self._ids[self._prefix_end :]
        self._prefix_end = len(self._ids)
        return chunk

    def _decode_window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        prefix = decode(self._ids[: self._prefix_end], skip_special_tokens=self._skip_special)
        return prefix, decode(self._ids, skip_special_tokens=self._skip_special)
