"""Recursive, token-aware splitting of documents into overlapping chunks to embed and cite.

A span that fits `chunk_size` tokens stays whole. One that does not is cut at the coarsest
boundaries it has: sections (headings), then paragraphs, sentences (English and Chinese), lines,
words — and characters only inside a single word longer than a chunk. The pieces are packed
back, in order, into chunks as large as fit; a piece too large for a chunk is cut the same way
at the next level. Chunks packed from the pieces of one section overlap: each starts with the
last whole pieces (paragraphs, sentences, lines or words) of the one before that fit in
`chunk_overlap` tokens. Different sections never overlap, and no chunk spans two pages. A
fenced code block is one piece, never cut unless it alone exceeds a chunk, and then only
between its lines. Every chunk is an exact slice of the document's text, and the same input
always gives the same chunks.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby, pairwise

from pagoda.errors import ConfigError
from pagoda.rag.document import Document, Span, code_blocks, strip_span
from pagoda.tokenizer.approx import CJK, approx_tokens

# Boundaries, as patterns whose match ends are the cuts (pieces are stripped of whitespace).
_CLOSERS = "\"'”’」』）)\\]"  # quotes and brackets that close a sentence after its mark
_PARAGRAPH = re.compile(r"\n[^\S\n]*\n\s*")  # a blank line
_SENTENCE = re.compile(
    rf"[。｡！？；]+[{_CLOSERS}]*"  # Chinese marks end a sentence where they stand
    rf"|(?<=[{CJK}])[.!?;]+[{_CLOSERS}]*"  # so do ASCII ones right after a Chinese character
    rf"|[.!?;]+[{_CLOSERS}]*(?=\s+[^\sa-z])"  # English: a space, then no lower-case word (e.g.)
)
_LINE = re.compile(r"\n")
_WORD = re.compile(rf"\s+|(?<=[{CJK}])|(?=[{CJK}])")  # each CJK character is a word of its own
_CHARACTER = re.compile(r"(?=.)", re.S)
_PROSE = (_PARAGRAPH, _SENTENCE, _LINE, _WORD, _CHARACTER)
_CODE = (_LINE, _WORD, _CHARACTER)


@dataclass(frozen=True)
class Chunk:
    """A passage to embed and cite: `text == document.text[start:end]`, with where it is from."""

    text: str
    source: str
    start: int
    end: int
    heading_path: tuple[str, ...] = ()
    page: int | None = None


@dataclass(frozen=True)
class Splitter:
    """Cuts documents into chunks of at most `chunk_size` tokens as `length` counts them.

    Pass the embedder tokenizer's counter (text tokens, no special tokens) as `length` so that
    chunks fit its window; `approx_tokens` stands in without one. Chunks are at most
    `chunk_size` tokens unless one character alone is more.
    """

    chunk_size: int = 256
    chunk_overlap: int = 32
    length: Callable[[str], int] = approx_tokens

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or not 0 <= self.chunk_overlap < self.chunk_size:
            raise ConfigError(f"chunk_size ({self.chunk_size}) must be positive and chunk_overlap "
                              f"({self.chunk_overlap}) at least 0 and below it")

    def split(self, document: Document) -> list[Chunk]:
        """The document's chunks in reading order."""
        return _Cutter(self, document.text).chunks(document)


class _Cutter:
    """One document's text being cut; spans index it."""

    def __init__(self, splitter: Splitter, text: str) -> None:
        self.text, self.splitter = text, splitter
        self.code = code_blocks(text)

    def chunks(self, document: Document) -> list[Chunk]:
        chunks = []
        for page, group in groupby(document.sections, key=lambda section: section.page):
            sections = list(group)
            starts = [s.start for s in sections]
            spans = [span for s in sections if (span := strip_span(self.text, s.start, s.end))]
            for start, end in self.pack(spans, _PROSE, overlap=0):
                touched = sections[bisect_right(starts, start) - 1:bisect_left(starts, end)]
                path = _common_prefix([s.heading_path for s in touched])
                chunks.append(Chunk(self.text[start:end], document.source, start, end, path, page))
        return chunks

    def tokens(self, start: int, end: int) -> int:
        return self.splitter.length(self.text[start:end])

    def fits(self, start: int, end: int) -> bool:
        return self.tokens(start, end) <= self.splitter.chunk_size

    def pack(self, pieces: list[Span], levels: Sequence[re.Pattern], overlap: int) -> list[Span]:
        """Consecutive pieces merged into chunks that fit; a piece too big is split on its own."""
        chunks: list[Span] = []
        window: list[Span] = []  # the pieces of the chunk being filled
        for piece in pieces:
            if not self.fits(*piece):
                if window:
                    chunks.append((window[0][0], window[-1][1]))
                window = []
                chunks += self.split(piece, levels)
            elif window and not self.fits(window[0][0], piece[1]):
                chunks.append((window[0][0], window[-1][1]))
                window = self.tail(window, piece, overlap) + [piece]
            else:
                window.append(piece)
        if window:
            chunks.append((window[0][0], window[-1][1]))
        return chunks

    def split(self, span: Span, levels: Sequence[re.Pattern]) -> list[Span]:
        """A span too big for one chunk, cut at the first level's boundaries and packed back."""
        if span in self.code:
            levels = _CODE
        if not levels:  # a single character over the limit: nothing left to cut
            return [span]
        return self.pack(self.pieces(span, levels[0]), levels[1:], self.splitter.chunk_overlap)

    def pieces(self, span: Span, boundary: re.Pattern) -> list[Span]:
        """`span` cut after every match of `boundary` except inside the code blocks it holds."""
        start, end = span
        cuts = [start]
        for block in self.code:
            if start <= block[0] and block[1] <= end and block != span:
                cuts += [m.end() for m in boundary.finditer(self.text, cuts[-1], block[0])]
                cuts += block
        cuts += [m.end() for m in boundary.finditer(self.text, cuts[-1], end)] + [end]
        return [piece for a, b in pairwise(cuts) if (piece := strip_span(self.text, a, b))]

    def tail(self, window: list[Span], following: Span, overlap: int) -> list[Span]:
        """Last whole pieces of `window`: at most `overlap` tokens, room left for `following`."""
        end, keep = window[-1][1], len(window)
        while keep and overlap and (self.tokens(window[keep - 1][0], end) <= overlap
                                    and self.fits(window[keep - 1][0], following[1])):
            keep -= 1
        return window[keep:]


def _common_prefix(paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The deepest heading path shared by all of `paths` (a chunk of several sections has it)."""
    first, last = min(paths), max(paths)  # sorted, the ends share only what all of them share
    common = 0
    while common < len(first) and first[common] == last[common]:
        common += 1
    return first[:common]
