"""The first stage of `pagoda data prepare`: files, folders and URLs in, `Record`s out.

Documents (txt, md, html, pdf, docx) are read by the knowledge-base loaders, one file, one
record. Datasets are read record by record: a JSONL line, a CSV row, an item of a JSON list,
JSONL and CSV streamed line by line so a file of any size runs in constant memory. Folders are
walked in name order, hidden entries left out, so two runs see the same records in the same
order. URLs go to the crawler. What cannot be used (a malformed line, an unreadable file, a page
robots.txt forbids) is skipped and noted in a `CollectReport`; only inputs that do not exist at
all stop the run, before any record is read.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pagoda.data.crawl import CrawlConfig, crawl
from pagoda.data.record import Record
from pagoda.errors import ConfigError, DocumentError
from pagoda.rag.loaders import EXTENSIONS, load_bytes
from pagoda.tokenizer.corpus import JSONL_SUFFIXES

CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
DOCUMENT_SUFFIXES = frozenset(s for s in EXTENSIONS if s not in CSV_DELIMITERS and s != ".json")
SUPPORTED_SUFFIXES = frozenset({*EXTENSIONS, *JSONL_SUFFIXES})


@dataclass(frozen=True)
class CollectConfig:
    """What to read and how: the text's JSON field and CSV column, the file suffixes to read
    (lower case, with the dot), whether folder walks follow symbolic links, how to crawl URLs."""

    text_field: str = "text"
    csv_column: str = "text"
    extensions: frozenset[str] = SUPPORTED_SUFFIXES
    follow_symlinks: bool = False
    crawl: CrawlConfig = field(default_factory=CrawlConfig)

    def __post_init__(self) -> None:
        if unknown := set(self.extensions) - SUPPORTED_SUFFIXES:
            raise ConfigError(f"cannot collect {', '.join(sorted(unknown))} files; supported: "
                              f"{' '.join(sorted(SUPPORTED_SUFFIXES))}")


@dataclass
class CollectReport:
    """What collection left out, for the manifest: every reason counted, and the first
    `keep` (source, reason) pairs in input order (a corpus with millions of bad lines must not
    grow the report without bound)."""

    keep: int = 1000
    skipped: list[tuple[str, str]] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)

    def skip(self, source: str, reason: str) -> None:
        self.reasons[reason] += 1
        if len(self.skipped) < self.keep:
            self.skipped.append((source, reason))


def collect(inputs: Sequence[str | Path], config: CollectConfig | None = None,
            report: CollectReport | None = None) -> Iterator[Record]:
    """Records from files and folders, in the order given, then from one crawl of the URLs.

    Raises `DocumentError` now, before reading anything, for a path that does not exist or a
    folder with no file to collect; everything later is skipped into `report` instead.
    """
    config = config or CollectConfig()
    report = report if report is not None else CollectReport()
    if not inputs:
        raise DocumentError("no inputs given: name files, folders or http(s) URLs")
    urls = [str(i) for i in inputs if _is_url(i)]
    paths = [Path(i) for i in inputs if not _is_url(i)]
    for path in paths:
        if not path.exists():
            raise DocumentError(f"{path}: no such file or folder")
        if path.is_dir() and not any(f.suffix.lower() in config.extensions
                                     for f in _walk(path, config.follow_symlinks, None)):
            raise DocumentError(f"{path}: no {' '.join(sorted(config.extensions))} files in "
                                "the folder")
    pages = crawl(urls, config.crawl, report) if urls else iter(())
    return _records(paths, pages, config, report)


def _is_url(item: str | Path) -> bool:
    return isinstance(item, str) and item.lower().startswith(("http://", "https://"))


def _records(paths: list[Path], pages: Iterator[Record], config: CollectConfig,
             report: CollectReport) -> Iterator[Record]:
    for path in paths:
        files = _walk(path, config.follow_symlinks, report) if path.is_dir() else [path]
        for file in files:
            yield from _file_records(file, config, report)
    yield from pages


def _walk(folder: Path, follow_symlinks: bool, report: CollectReport | None) -> Iterator[Path]:
    """Files under `folder`, depth first in name order; hidden entries and (unless followed)
    symbolic links are left out, and no folder is entered twice (link loops)."""
    entered: set[tuple[int, int]] = set()

    def walk(path: str) -> Iterator[Path]:
        try:
            status = os.stat(path)
            if (status.st_dev, status.st_ino) in entered:
                return
            entered.add((status.st_dev, status.st_ino))
            entries = sorted(os.scandir(path), key=lambda entry: entry.name)
        except OSError as e:
            if report is not None:
                report.skip(path, f"cannot read the folder ({e.strerror or e})")
            return
        for entry in entries:
            if entry.name.startswith(".") or (entry.is_symlink() and not follow_symlinks):
                continue
            if entry.is_dir():
                yield from walk(entry.path)
            elif entry.is_file():
                yield Path(entry.path)

    return walk(str(folder))


def _file_records(path: Path, config: CollectConfig, report: CollectReport) -> Iterator[Record]:
    source, suffix = str(path), path.suffix.lower()
    if suffix not in config.extensions:
        report.skip(source, f"unsupported file type {suffix or '(no extension)'}")
        return
    try:
        if suffix in JSONL_SUFFIXES:
            yield from _jsonl_records(path, config.text_field, report)
        elif suffix in CSV_DELIMITERS:
            yield from _csv_records(path, config.csv_column, CSV_DELIMITERS[suffix], report)
        elif suffix == ".json":
            yield from _json_records(path, config.text_field, report)
        else:
            data = path.read_bytes()
            document = load_bytes(data, source)
            yield Record(document.text, source, {"format": document.format, "bytes": len(data)})
    except OSError as e:
        report.skip(source, f"cannot read the file ({e.strerror or e})")
    except DocumentError as e:
        report.skip(source, str(e).removeprefix(f"{source}: "))


def _jsonl_records(path: Path, text_field: str, report: CollectReport) -> Iterator[Record]:
    """One record per non-blank line, read one line at a time."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                value = json.loads(line)
            except UnicodeDecodeError:
                report.skip(where, "not UTF-8 text")
                continue
            except ValueError:
                report.skip(where, "invalid JSON")
                continue
            if record := _object_record(value, where, "jsonl", len(line), text_field, report):
                yield record


def _json_records(path: Path, text_field: str, report: CollectReport) -> Iterator[Record]:
    """A list of objects is a dataset (sources `path[i]`, from 0); one object is one record.
    Read whole, unlike JSONL: large datasets belong in JSONL."""
    data = path.read_bytes()
    try:
        value = json.loads(data)
    except ValueError:
        report.skip(str(path), "invalid JSON")
        return
    if not isinstance(value, list):
        if record := _object_record(value, str(path), "json", len(data), text_field, report):
            yield record
        return
    for i, item in enumerate(value):
        size = len(json.dumps(item, ensure_ascii=False).encode())
        if record := _object_record(item, f"{path}[{i}]", "json", size, text_field, report):
            yield record


def _object_record(value: Any, source: str, fmt: str, size: int, text_field: str,
                   report: CollectReport) -> Record | None:
    """The record of one JSON object: its text field, its other scalar fields as meta."""
    text = value.get(text_field) if isinstance(value, dict) else None
    if not isinstance(text, str):
        report.skip(source, f"no string field {text_field!r}")
        return None
    if not text.strip():
        report.skip(source, "empty text")
        return None
    fields = {k: v for k, v in value.items()
              if k != text_field and (v is None or isinstance(v, str | int | float | bool))}
    return Record(text, source, {**fields, "format": fmt, "bytes": size})


class _Lines:
    """A binary file's lines decoded as UTF-8 for the csv module, one at a time. Undecodable
    lines are reported and left out; `row_start` and `row_bytes` tell where a row came from."""

    def __init__(self, file: IO[bytes], source: str, report: CollectReport) -> None:
        self.file, self.source, self.report = file, source, report
        self.number = 0
        self.row_start, self.row_bytes = 0, 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        for raw in self.file:
            self.number += 1
            try:
                line = raw.decode("utf-8-sig" if self.number == 1 else "utf-8")
            except UnicodeDecodeError:
                self.report.skip(f"{self.source}:{self.number}", "not UTF-8 text")
                continue
            self.row_start = self.row_start or self.number
            self.row_bytes += len(raw)
            return line
        raise StopIteration

    def next_row(self) -> None:
        self.row_start, self.row_bytes = 0, 0


def _csv_records(path: Path, column: str, delimiter: str,
                 report: CollectReport) -> Iterator[Record]:
    """One record per row after the header, the text in `column`, the other cells as meta."""
    with open(path, "rb") as f:
        lines = _Lines(f, str(path), report)
        rows = csv.reader(lines, delimiter=delimiter)
        header: list[str] | None = None
        while True:
            lines.next_row()
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as e:
                report.skip(f"{path}:{lines.row_start}", f"malformed CSV row ({e})")
                continue
            if not row:  # a blank line
                continue
            if header is None:
                header = [name.strip() for name in row]
                if column not in header:
                    report.skip(str(path), f"no column {column!r} (columns: {', '.join(header)})")
                    return
                continue
            where = f"{path}:{lines.row_start}"
            if len(row) != len(header):
                report.skip(where, f"{len(row)} fields where the header has {len(header)}")
                continue
            cells = dict(zip(header, row, strict=True))
            text = cells.pop(column)
            if not text.strip():
                report.skip(where, "empty text")
                continue
            yield Record(text, where, {**cells, "format": "csv", "bytes": lines.row_bytes})
