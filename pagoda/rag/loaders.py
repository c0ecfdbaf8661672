"""Files in, `Document`s out: one loader per format, picked by extension and checked by content.

Markdown and plain text keep the file's own text, so offsets index what the user wrote. The
other formats are rendered to plain text one block at a time (a paragraph, a heading, a table,
a CSV row, a JSON record), blocks separated by a blank line, so the splitter finds paragraphs
wherever the original had them. Every way a file can be unusable (unsupported type, empty,
binary posing as text, corrupt, a PDF without a text layer) raises `DocumentError` naming the
file and the reason. Parsers are imported on first use: nothing else needs them.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath

from pagoda.errors import DocumentError
from pagoda.rag.document import Document, Section, code_blocks, strip_span

Loader = Callable[[bytes, str], Document]  # (file content, source) -> document


def load_document(path: str | Path) -> Document:
    """Load the file at `path`; the path, as given, becomes the document's `source`."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DocumentError(f"{source}: cannot read the file ({e.strerror or e})") from None
    return load_bytes(data, source)


def load_bytes(data: bytes, source: str) -> Document:
    """Load file content (an upload, say): `source` names it, its extension picks the loader."""
    if not data:
        raise DocumentError(f"{source}: the file is empty")
    fmt = detect_format(source, data)
    try:
        document = LOADERS[fmt](data, source)
    except (DocumentError, ImportError):  # a missing parser is not the file's fault
        raise
    except Exception as e:  # parsers of untrusted files fail in many ways; all mean "unreadable"
        reason = " ".join(str(e).split())  # one line, whatever the parser wrote
        raise DocumentError(f"{source}: cannot be read as {fmt.upper()} "
                            f"({type(e).__name__}: {reason}); is the file damaged?") from e
    if not document.sections:
        raise DocumentError(f"{source}: there is no text in it")
    return document


def detect_format(source: str, data: bytes) -> str:
    """The format the extension names, corrected by the first bytes where they are unmistakable."""
    extension = PurePath(source).suffix.lower()
    named = EXTENSIONS.get(extension)
    if data.startswith(b"%PDF-") or (named == "pdf" and b"%PDF-" in data[:1024]):
        return "pdf"
    if named is None:
        raise DocumentError(f"{source}: unsupported file type {extension or '(no extension)'}; "
                            f"supported: {' '.join(EXTENSIONS)}")
    if named == "pdf":
        raise DocumentError(f"{source}: not a PDF file (no %PDF- header); is the extension right?")
    if named == "docx" and not data.startswith(b"PK\x03\x04"):
        raise DocumentError(f"{source}: not a .docx file (those are zip archives; "
                            "save old .doc files as .docx)")
    if named == "txt" and re.match(rb"\s*<(!doctype html|html)[\s>]", data[:1024], re.I):
        return "html"
    return named


def _decode(data: bytes, source: str) -> str:
    """The content as text: UTF-8 (BOM dropped) or UTF-16 with a BOM; newlines become \\n."""
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            text = data.decode("utf-16")
        elif b"\x00" in data:
            raise DocumentError(f"{source}: binary data (NUL bytes), not text; "
                                "is the extension right?")
        else:
            text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{source}: not UTF-8 text (undecodable byte at offset {e.start}); "
                            "a binary file, or re-save it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


class _Outline:
    """The headings open at a point of a document: a new one closes those at its level or deeper."""

    def __init__(self) -> None:
        self._open: list[tuple[int, str]] = []

    def enter(self, level: int, title: str) -> None:
        self._open = [h for h in self._open if h[0] < level] + [(level, title)]

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(title for _, title in self._open)


class _Builder:
    """Plain text assembled block by block, a blank line between blocks.

    Consecutive blocks under one heading path and on one page form one section.
    """

    def __init__(self, source: str, fmt: str) -> None:
        self.source, self.format = source, fmt
        self._parts: list[str] = []
        self._length = 0
        self._sections: list[Section] = []

    def add(self, block: str, heading_path: tuple[str, ...] = (), page: int | None = None) -> None:
        block = block.strip()
        if not block:
            return
        if self._parts:
            self._parts.append("\n\n")
            self._length += 2
        start = self._length
        self._parts.append(block)
        self._length += len(block)
        last = self._sections[-1] if self._sections else None
        if last and (last.heading_path, last.page) == (heading_path, page):
            start = last.start
            self._sections.pop()
        self._sections.append(Section(start, self._length, heading_path, page))

    def build(self) -> Document:
        return Document(self.source, self.format, "".join(self._parts), tuple(self._sections))


def load_text(data: bytes, source: str) -> Document:
    """Plain text: one section, no headings."""
    text = _decode(data, source)
    span = strip_span(text, 0, len(text))
    return Document(source, "txt", text, (Section(*span),) if span else ())


# `# Title` (ATX, closing #s optional) or a line underlined with === or --- (setext)
_MD_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$"
                         r"|^(\S.*)\n {0,3}(=+|-+)[ \t]*$", re.M)


def load_markdown(data: bytes, source: str) -> Document:
    """Markdown as written; each heading outside code blocks opens a section that includes it."""
    text = _decode(data, source)
    code = code_blocks(text)
    outline = _Outline()
    bounds: list[tuple[int, tuple[str, ...]]] = [(0, ())]  # (where a section starts, its path)
    for m in _MD_HEADING.finditer(text):
        if any(start <= m.start() < end for start, end in code):
            continue
        level = len(m[1]) if m[1] else (1 if m[4][0] == "=" else 2)
        outline.enter(level, (m[2] or m[3]).strip())
        bounds.append((m.start(), outline.path))
    ends = [start for start, _ in bounds[1:]] + [len(text)]
    sections = [Section(*span, path) for (start, path), end in zip(bounds, ends, strict=True)
                if (span := strip_span(text, start, end))]
    return Document(source, "md", text, tuple(sections))


_HTML_SKIP = {"script", "style", "nav", "noscript", "template", "head"}
_HTML_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
_HTML_BLOCKS = {"address", "article", "aside", "blockquote", "br", "caption", "dd", "details",
                "div", "dl", "dt", "figcaption", "figure", "footer", "form", "header", "hr",
                "li", "main", "ol", "p", "section", "summary", "table", "tr", "ul"}


def load_html(data: bytes, source: str) -> Document:
    """Visible text of a page; h1-h6 make the heading path, <pre> becomes a fenced code block."""
    from bs4 import BeautifulSoup
    from bs4.element import NavigableString, PreformattedString

    doc, outline = _Builder(source, "html"), _Outline()
    line: list[str] = []  # inline text of the block being read

    def end_block() -> None:
        doc.add(" ".join("".join(line).split()), outline.path)
        line.clear()

    def walk(node) -> None:
        for child in node.children:
            if isinstance(child, NavigableString):
                if not isinstance(child, PreformattedString):  # comments, doctype, ...
                    line.append(child)
            elif child.name in _HTML_HEADINGS:
                end_block()
                title = " ".join(child.get_text().split())
                if title:
                    outline.enter(int(child.name[1]), title)
                    doc.add(title, outline.path)
            elif child.name == "pre":
                end_block()
                if (code := child.get_text().strip("\n")).strip():
                    fence = "`" * max(3, 1 + max(map(len, re.findall("`+", code)), default=0))
                    doc.add(f"{fence}\n{code}\n{fence}", outline.path)
            elif child.name in _HTML_BLOCKS:
                end_block()
                walk(child)
                end_block()
            elif child.name not in _HTML_SKIP:
                walk(child)
                if child.name in ("td", "th"):
                    line.append(" ")

    walk(BeautifulSoup(_decode(data, source), "html.parser"))
    end_block()
    return doc.build()


def load_pdf(data: bytes, source: str) -> Document:
    """The text layer of each page: one section per page, numbered from 1."""
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data))
    if reader.is_encrypted and not reader.decrypt(""):
        raise DocumentError(f"{source}: the PDF is password-protected; remove the password first")
    doc = _Builder(source, "pdf")
    for number, page in enumerate(reader.pages, start=1):
        doc.add(page.extract_text(), page=number)
    document = doc.build()
    if not document.sections:
        raise DocumentError(f"{source}: the PDF has no extractable text (a scan? run OCR on it "
                            "first)")
    return document


def load_docx(data: bytes, source: str) -> Document:
    """Paragraphs and tables of a Word file; the Title and Heading 1-9 styles make headings."""
    import docx
    from docx.table import Table

    doc, outline = _Builder(source, "docx"), _Outline()
    for block in docx.Document(io.BytesIO(data)).iter_inner_content():
        if isinstance(block, Table):
            rows = (" | ".join(cell.text.strip() for cell in row.cells) for row in block.rows)
            doc.add("\n".join(rows), outline.path)
            continue
        level = _docx_heading_level(block.style.name if block.style is not None else "")
        if level is not None and block.text.strip():
            outline.enter(level, block.text.strip())
        doc.add(block.text, outline.path)
    return doc.build()


def _docx_heading_level(style: str) -> int | None:
    """Title sits above Heading 1 (level 0); any other style is body text."""
    if style == "Title":
        return 0
    m = re.fullmatch(r"Heading ([1-9])", style)
    return int(m[1]) if m else None


def load_csv(data: bytes, source: str) -> Document:
    """One block per row, a `column: value` line per filled cell; row 1 names the columns."""
    text = _decode(data, source)
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:  # one column, or too irregular to tell: plain commas
        dialect = csv.excel
    rows = csv.reader(io.StringIO(text), dialect)
    header = [name.strip() for name in next(rows, [])]
    doc = _Builder(source, "csv")
    for row in rows:
        doc.add("\n".join(f"{_column(header, i)}: {value.strip()}"
                          for i, value in enumerate(row) if value.strip()))
    return doc.build()


def _column(header: list[str], i: int) -> str:
    return header[i] if i < len(header) and header[i] else f"column {i + 1}"


def load_json(data: bytes, source: str) -> Document:
    """One block per record (each item of a top-level list, else the whole value)."""
    value = json.loads(_decode(data, source))
    doc = _Builder(source, "json")
    for record in value if isinstance(value, list) else [value]:
        doc.add("\n".join(_json_lines(record)))
    return doc.build()


def _json_lines(value: object, key: str = "") -> Iterator[str]:
    """`a.b[0].c: value` for every scalar of a JSON value; a list of scalars stays on one line."""
    if isinstance(value, dict):
        for name, item in value.items():
            yield from _json_lines(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
        for i, item in enumerate(value):
            yield from _json_lines(item, f"{key}[{i}]")
    else:
        items = value if isinstance(value, list) else [value]
        text = ", ".join(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                         for v in items)
        yield f"{key}: {text}" if key else text


LOADERS: dict[str, Loader] = {
    "txt": load_text, "md": load_markdown, "html": load_html, "pdf": load_pdf,
    "docx": load_docx, "csv": load_csv, "json": load_json,
}
EXTENSIONS = {  # extension -> format
    ".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".html": "html",
    ".htm": "html", ".pdf": "pdf", ".docx": "docx", ".csv": "csv", ".tsv": "csv", ".json": "json",
}
