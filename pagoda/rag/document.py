"""What loaders produce and the splitter cuts: a document's plain text and its sections."""

from __future__ import annotations

import re
from dataclasses import dataclass

Span = tuple[int, int]  # [start, end) character offsets into a document's text


@dataclass(frozen=True)
class Section:
    """`text[start:end]` of a document, all under one heading path and on one page.

    `heading_path` lists the open headings, outermost first (`("Install", "Linux")`); `page` is
    1-based for paged formats (PDF) and None otherwise.
    """

    start: int
    end: int
    heading_path: tuple[str, ...] = ()
    page: int | None = None


@dataclass(frozen=True)
class Document:
    """A loaded file: its plain text and its sections in reading order (they do not overlap).

    `source` is the path as the user gave it, which is what citations show; `format` is the
    loader that read it (`txt`, `md`, `html`, `pdf`, `docx`, `csv`, `json`).
    """

    source: str
    format: str
    text: str
    sections: tuple[Section, ...]


# A fenced code block: ``` or ~~~ (up to 3 spaces in) to the same fence on its own line, or to
# the end of the text when it is never closed (CommonMark's rule).
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n.*?(?:^ {0,3}\1[ \t]*$|\Z)", re.M | re.S)


def code_blocks(text: str) -> list[Span]:
    """Spans of the fenced code blocks in `text`: no heading inside them, no cut through them."""
    return [span for m in _FENCE.finditer(text) if (span := strip_span(text, *m.span()))]


def strip_span(text: str, start: int, end: int) -> Span | None:
    """`(start, end)` narrowed past surrounding whitespace; None if nothing else is in it."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None
