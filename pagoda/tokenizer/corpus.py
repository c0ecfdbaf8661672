"""Training text read from files in pieces of about a megabyte, never a whole file at once.

Tokenizer training and corpus tokenizing both read corpora that may be larger than memory, so
they share one reader. A text file (.txt, .md, anything not JSONL) is one document, read in
blocks cut after a newline; a JSONL file holds one document per line, its text in a field
(`text` by default). Folders are walked recursively for .txt, .md and .jsonl files. Each
`Piece` says whether it starts a document and how many bytes of the file it covers, which
drives progress bars and the held-out split.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pagoda.errors import PagodaError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
FOLDER_SUFFIXES = (".txt", ".md", *JSONL_SUFFIXES)
BLOCK_BYTES = 1 << 20


class CorpusError(PagodaError):
    """A training corpus cannot be used: a file is missing, empty, not UTF-8 or malformed."""


@dataclass(frozen=True)
class Piece:
    """Some text of one document; `size` is the number of file bytes it was read from."""

    text: str
    starts_document: bool
    size: int


def corpus_files(inputs: Iterable[str | Path]) -> list[Path]:
    """The files named, folders expanded (sorted, recursively); missing or empty ones refused."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES)
            if not found:
                raise CorpusError(f"{path}: no {', '.join(FOLDER_SUFFIXES)} files in the folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise CorpusError(f"{path}: no such file or folder")
    if not files:
        raise CorpusError("no input files given")
    for path in files:
        if path.stat().st_size == 0:
            raise CorpusError(f"{path}: the file is empty")
    return files


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES


def read_pieces(path: Path, text_field: str = "text",
                block_bytes: int = BLOCK_BYTES) -> Iterator[Piece]:
    """The file's documents as pieces, in file order."""
    if is_jsonl(path):
        return _jsonl_pieces(path, text_field)
    return _text_pieces(path, block_bytes)


def _not_utf8(place: str, error: UnicodeDecodeError) -> CorpusError:
    return CorpusError(f"{place}: not UTF-8 text ({error.reason}); convert the file to UTF-8")


def _text_pieces(path: Path, block_bytes: int) -> Iterator[Piece]:
    """One document in blocks of about `block_bytes`, each ending after a newline when it can."""
    decoder = codecs.getincrementaldecoder("utf-8")()  # a block may end inside a character
    first, carry = True, ""
    with open(path, "rb") as f:
        try:
            while block := f.read(block_bytes):
                text = carry + decoder.decode(block)
                cut = text.rfind("\n") + 1 or len(text)
                carry = text[cut:]
                if cut:
                    yield Piece(text[:cut], first, len(text[:cut].encode()))
                    first = False
            text = carry + decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise _not_utf8(str(path), e) from None
    if text:
        yield Piece(text, first, len(text.encode()))


def _jsonl_pieces(path: Path, text_field: str) -> Iterator[Piece]:
    """One document per non-blank line: the string in `text_field` of a JSON object."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise _not_utf8(where, e) from None
            except json.JSONDecodeError as e:
                raise CorpusError(f"{where}: not valid JSON ({e.msg})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CorpusError(f"{where}: expected a JSON object with a string field "
                                  f"{text_field!r} (choose the field with --text-field)")
            if text:
                yield Piece(text, True, len(line))
