"""The data inbox: documents uploaded or posted by webhook, queued for `pagoda data prepare`.

Each dataset is a folder, `$PAGODA_HOME/data/inbox/<dataset>/`, that `prepare` reads like any
folder input. An upload is stored as `<sha256[:12]>-<name>` and a webhook delivery as one
`webhook-<sha256[:16]>.jsonl`, both named by their content, so a retried delivery finds its file
already there (no second copy) and two different files of the same name both stay. Files appear
whole or not at all: written to a hidden temporary file in the folder (which `collect` skips),
fsynced, then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

from pagoda.data.collect import SUPPORTED_SUFFIXES
from pagoda.errors import DocumentError, InvalidRequestError, PagodaError
from pagoda.paths import atomic_write, fsync_path, pagoda_home

DATASET_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
UNSAFE_CHARS = re.compile(r"[^\w.-]+")
MAX_STEM_BYTES = 200  # UTF-8; with the hash prefix and the suffix under the 255 of most file systems
WEBHOOK_PREFIX = "webhook-"


class DatasetNotFoundError(PagodaError):
    """Nothing has been queued for that dataset name."""

    http_status = 404
    code = "dataset_not_found"


@dataclass(frozen=True)
class QueuedItem:
    """One file of a dataset's inbox; `records` counts a webhook file's lines (None: upload)."""

    name: str
    bytes: int
    kind: Literal["upload", "webhook"]
    records: int | None = None


def inbox_dir(dataset: str) -> Path:
    """The folder of a dataset's queued documents (the name checked, so it stays one folder)."""
    if not isinstance(dataset, str) or not DATASET_NAME.fullmatch(dataset):
        raise InvalidRequestError(
            f"bad dataset name {dataset!r}: use 1-64 letters, digits, '_', '-' or '.', not "
            "starting with '.'")
    return pagoda_home() / "data" / "inbox" / dataset


def upload_name(filename: str, data: bytes) -> str:
    """The stored name of an upload: content hash, then the file's own name made safe (only its
    last path component, odd characters replaced). DocumentError for what collect cannot read."""
    base = PureWindowsPath(PurePosixPath(filename).name).name  # drops '../', 'C:\\', '/etc/'
    stem, suffix = os.path.splitext(base)
    if suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DocumentError(f"{filename or '(no name)'}: unsupported file type "
                            f"{suffix or '(no extension)'}; supported: "
                            f"{' '.join(sorted(SUPPORTED_SUFFIXES))}")
    if not data:
        raise DocumentError(f"{filename}: the file is empty")
    safe_stem = UNSAFE_CHARS.sub("_", stem).encode()[:MAX_STEM_BYTES].decode(errors="ignore")
    return f"{hashlib.sha256(data).hexdigest()[:12]}-{safe_stem or 'upload'}{suffix.lower()}"


def enqueue_files(dataset: str, files: Sequence[tuple[str, bytes]]) -> list[QueuedItem]:
    """Queue uploaded (filename, bytes) pairs; every file is checked before any is stored."""
    folder = inbox_dir(dataset)
    named = [(upload_name(filename, data), data) for filename, data in files]
    return [_store(folder, name, data, "upload") for name, data in named]


def enqueue_file(dataset: str, filename: str, data: bytes) -> QueuedItem:
    """Queue one uploaded document (txt, md, html, pdf, docx, csv, json, jsonl, ...)."""
    return enqueue_files(dataset, [(filename, data)])[0]


def enqueue_records(dataset: str, records: list[dict[str, Any]]) -> QueuedItem:
    """Queue one webhook delivery as one JSONL file. Every record must be an object with a
    non-empty string `text`; its other fields must be scalars (kept as the record's metadata)."""
    folder = inbox_dir(dataset)
    if not isinstance(records, list) or not records:
        raise InvalidRequestError("a webhook delivery needs at least one record")
    for index, record in enumerate(records):
        _check_record(index, record)
    canonical = json.dumps(records, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    name = f"{WEBHOOK_PREFIX}{hashlib.sha256(canonical.encode()).hexdigest()[:16]}.jsonl"
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return _store(folder, name, lines.encode(), "webhook", len(records))


def list_inbox(dataset: str) -> list[QueuedItem]:
    """The dataset's queued files in name order (the order `collect` reads them)."""
    folder = inbox_dir(dataset)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"no dataset named '{dataset}' in the inbox: nothing has "
                                   "been queued for it")
    items = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue  # temporary files of writes in progress
        if path.name.startswith(WEBHOOK_PREFIX) and path.suffix == ".jsonl":
            with open(path, "rb") as f:
                count = sum(1 for line in f if line.strip())
            items.append(QueuedItem(path.name, path.stat().st_size, "webhook", count))
        else:
            items.append(QueuedItem(path.name, path.stat().st_size, "upload"))
    return items


def _check_record(index: int, record: object) -> None:
    if not isinstance(record, dict):
        raise InvalidRequestError(f"record {index} is not a JSON object")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError(f"record {index} needs a non-empty string field 'text'")
    for key, value in record.items():
        if not (value is None or isinstance(value, str | int | float | bool)):
            raise InvalidRequestError(f"record {index}: field {key!r} must be a string, number, "
                                      "boolean or null (nested values are not kept)")


def _store(folder: Path, name: str, data: bytes, kind: Literal["upload", "webhook"],
           records: int | None = None) -> QueuedItem:
    """Write `data` as folder/name atomically, unless it is already there (same content)."""
    path = folder / name
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)  # a hidden temp file: collect skips it
        fsync_path(folder)
    return QueuedItem(name, len(data), kind, records)
