"""Token shards on disk: flat `.bin` files of token ids plus one `index.json` describing them.

A corpus tokenized once is read many times by training, so it is stored the way a reader wants
it: raw little-endian ids (uint16 when the vocabulary fits, else uint32), each split a sequence of
files that together form one stream, read through `np.memmap` in constant memory. Documents are
concatenated with the separator id (`eot_id`) placed before each one; a tokenizer without one
(character level) just concatenates, as nanoGPT does. Writers use temporary names renamed at
close, and the index is written last and atomically, so a crash never leaves an index that
describes files which are not all there.

Layout of a shard folder::

    DIR/index.json
    DIR/tokenizer.json (+ tokenizer_config.json)   # a copy of the tokenizer used
    DIR/train-00000.bin ...  DIR/val-00000.bin ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from pagoda.errors import PagodaError

FORMAT = "pagoda-token-shards"
VERSION = 1
INDEX = "index.json"
DTYPES = ("uint16", "uint32")


class ShardError(PagodaError):
    """A token-shard folder is missing, incomplete or not one Pagoda wrote."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest id type that holds every id of a vocabulary this size."""
    return np.dtype("uint16" if vocab_size <= 2**16 else "uint32")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.bin"


def _fsync_rename(temp: Path, final: Path) -> None:
    """Make `temp` durable, then give it its final name in one step."""
    with open(temp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(temp, final)


class ShardWriter:
    """Appends token ids to one split's `.bin` files, starting a new file every `shard_tokens`.

    Files are written under temporary names and renamed when the writer closes cleanly; on an
    exception inside the `with` block they are removed instead. `files` then lists
    `{"name", "tokens"}` for the index.
    """

    def __init__(self, out_dir: str | Path, split: str, dtype: str | np.dtype,
                 shard_tokens: int = 100_000_000) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, not {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_tokens = shard_tokens
        self.files: list[dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0
        self._handle: Any = None
        self._temps: list[Path] = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def write(self, ids: np.ndarray, documents: int = 0) -> None:
        """Append `ids` (any integer array); `documents` counts how many documents they start."""
        ids = np.asarray(ids).ravel()
        self.documents += documents
        while ids.size:
            if self._handle is None or self.files[-1]["tokens"] == self.shard_tokens:
                self._next_file()
            room = self.shard_tokens - self.files[-1]["tokens"]
            chunk = ids[:room]
            self._handle.write(chunk.astype(self.dtype, copy=False).tobytes())
            self.files[-1]["tokens"] += chunk.size
            self.tokens += chunk.size
            ids = ids[room:]

    def _next_file(self) -> None:
        if self._handle is not None:
            self._handle.close()
        name = shard_name(self.split, len(self.files))
        temp = self.out_dir / f".{name}.tmp"
        self._temps.append(temp)
        self._handle = open(temp, "wb")
        self.files.append({"name": name, "tokens": 0})

    def close(self) -> None:
        """Finish the last file and give every file its final name."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        for temp, entry in zip(self._temps, self.files, strict=True):
            _fsync_rename(temp, self.out_dir / entry["name"])
        self._temps = []

    def abort(self) -> None:
        """Drop everything written: a failed run leaves no partial shard behind."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        for temp in self._temps:
            temp.unlink(missing_ok=True)
        self._temps = []

    def entry(self) -> dict[str, Any]:
        """This split as `index.json` describes it."""
        return {"files": list(self.files), "tokens": self.tokens, "documents": self.documents}


def write_index(out_dir: str | Path, *, dtype: str | np.dtype, vocab_size: int,
                eot_id: int | None, splits: dict[str, dict[str, Any]],
                tokenizer: str | None = "tokenizer.json") -> dict[str, Any]:
    """Write `index.json` atomically (temp file, fsync, rename) and return it; call it last."""
    index = {"format": FORMAT, "version": VERSION, "dtype": np.dtype(dtype).name,
             "vocab_size": int(vocab_size), "eot_id": eot_id, "tokenizer": tokenizer,
             "splits": splits}
    final = Path(out_dir) / INDEX
    temp = final.with_name(f".{INDEX}.tmp")
    temp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    _fsync_rename(temp, final)
    return index


def read_index(folder: str | Path) -> dict[str, Any]:
    """The index of a shard folder, checked to be one this version of Pagoda can read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"{folder}: no such token-shard folder; create one with "
                         "`pagoda data tokenize`")
    path = folder / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{folder}: no {INDEX} (not a token-shard folder, or tokenizing did "
                         "not finish); run `pagoda data tokenize` again") from None
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: cannot be read ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise ShardError(f"{path}: format version {index.get('version')!r}; this Pagoda reads "
                         f"version {VERSION}")
    if index.get("dtype") not in DTYPES:
        raise ShardError(f"{path}: unsupported dtype {index.get('dtype')!r}; expected one of "
                         f"{', '.join(DTYPES)}")
    return index


class TokenShards:
    """One split of a shard folder seen as a single stream of token ids, read via `np.memmap`.

    Memory maps are opened on first read and dropped when pickled, so an instance can be sent
    to data-loader worker processes cheaply.
    """

    def __init__(self, folder: Path, split: str, index: dict[str, Any]) -> None:
        entry = index["splits"][split]
        self.folder = folder
        self.split = split
        self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
        self.vocab_size: int = index["vocab_size"]
        self.eot_id: int | None = index["eot_id"]
        self.documents: int = entry.get("documents", 0)
        tokenizer = index.get("tokenizer")
        self.tokenizer_path = folder / tokenizer if tokenizer else None
        self.paths = [folder / f["name"] for f in entry["files"] if f["tokens"]]
        sizes = [f["tokens"] for f in entry["files"] if f["tokens"]]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.tokens = int(self.starts[-1])
        self._maps: dict[int, np.memmap] = {}

    @classmethod
    def open(cls, folder: str | Path, split: str = "train") -> TokenShards:
        """Open `split` of the shard folder, checking every file against the index."""
        folder = Path(folder)
        index = read_index(folder)
        splits = index.get("splits") or {}
        if split not in splits:
            raise ShardError(f"{folder}: no split {split!r} in the index; it has "
                             f"{', '.join(splits) or 'none'}")
        itemsize = np.dtype(index["dtype"]).itemsize
        for f in splits[split]["files"]:
            path = folder / f["name"]
            expected = f["tokens"] * itemsize
            try:
                actual = path.stat().st_size
            except FileNotFoundError:
                raise ShardError(f"{path}: listed in {INDEX} but missing") from None
            if actual != expected:
                raise ShardError(f"{path}: {actual} bytes, but {INDEX} says {f['tokens']} "
                                 f"tokens ({expected} bytes); the folder is damaged, tokenize "
                                 "again")
        return cls(folder, split, index)

    def __len__(self) -> int:
        return self.tokens

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def _map(self, number: int) -> np.memmap:
        if number not in self._maps:
            self._maps[number] = np.memmap(self.paths[number], dtype=self.dtype, mode="r")
        return self._maps[number]

    def read(self, start: int, length: int) -> np.ndarray:
        """Ids `start` .. `start + length` of the split's stream as int64, across file ends."""
        if start < 0 or length < 0 or start + length > self.tokens:
            raise IndexError(f"cannot read {length} tokens at {start} from {self.tokens} "
                             f"tokens of split {self.split!r}")
        out = np.empty(length, dtype=np.int64)
        number = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self.starts[number])
            take = min(length - done, int(self.starts[number + 1]) - start - done)
            out[done:done + take] = self._map(number)[offset:offset + take]
            done += take
            number += 1
        return out
