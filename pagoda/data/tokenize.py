"""Text files and JSONL in, token shards out: streaming, parallel, and the same bytes every run.

Pieces of text (see `pagoda.tokenizer.corpus`) are grouped into batches of about a megabyte and
encoded by a pool of worker processes; at most a few batches per worker are in flight and
results are written in submission order, so memory stays constant and the shards do not depend
on the number of workers. The separator token goes before each document (see
`pagoda.data.shards`). Documents go to validation by a hash of their number; a corpus that is a
single text file (tiny Shakespeare) is one document, so its last `val_fraction` of tokens
become the validation split instead, as nanoGPT does. A large text file is encoded in ~1 MB
blocks cut at line ends; tokens never span a block boundary, which costs a token or so a
megabyte and keeps decoding exact.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from pagoda.data.shards import INDEX, ShardWriter, token_dtype, write_index
from pagoda.errors import ConfigError
from pagoda.tokenizer import Tokenizer
from pagoda.tokenizer.corpus import CorpusError, Piece, corpus_files, is_jsonl, read_pieces

BATCH_BYTES = 1 << 20
IN_FLIGHT_PER_WORKER = 4
COPY_TOKENS = 1 << 24  # tokens moved at a time when splitting a single document
SEPARATORS = ("<|endoftext|>",)  # preferred document separators, before the tokenizer's BOS/EOS


def load_tokenizer(name_or_path: str | Path, pull: bool = True) -> Tokenizer:
    """A tokenizer folder or tokenizer.json file, or the tokenizer of a model (pulled if
    `pull` allows)."""
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".json" or (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(path)
    # imported here: the model storey loads torch, which tokenizing workers do not need
    from pagoda.hub import model_file, resolve
    from pagoda.model.gguf_io import read_gguf_metadata

    target = model_file(resolve(str(name_or_path), pull_if_missing=pull))
    if target.suffix == ".gguf":
        return Tokenizer.from_gguf_metadata(read_gguf_metadata(target))
    return Tokenizer.from_file(target)


def separator_id(tokenizer: Tokenizer) -> int | None:
    """The id placed before each document: <|endoftext|>, else BOS, else EOS, else none."""
    named = (tokenizer.token_to_id(t) for t in SEPARATORS)
    return next((i for i in (*named, tokenizer.bos_id, tokenizer.eos_id) if i is not None), None)


def is_validation(document: int, val_fraction: float) -> bool:
    """Whether document number `document` belongs to validation: a stable hash, not `random`."""
    digest = hashlib.blake2b(document.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def tokenize_corpus(inputs: Iterable[str | Path], tokenizer: Tokenizer | str | Path,
                    out_dir: str | Path, *, val_fraction: float = 0.005,
                    workers: int | None = None, text_field: str = "text",
                    shard_tokens: int = 100_000_000, progress: bool = False) -> dict[str, Any]:
    """Tokenize `inputs` (files, folders) into a shard folder and return its index."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"validation fraction must be in [0, 1), not {val_fraction}")
    if shard_tokens < 1:
        raise ConfigError(f"shard size must be at least 1 token, not {shard_tokens}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, not {workers}")
    files = corpus_files(inputs)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # the old index would describe files about to change
    dtype = token_dtype(tok.vocab_size)
    eot = separator_id(tok)
    single = len(files) == 1 and not is_jsonl(files[0])
    with (_bar(progress) as bar, ShardWriter(out, "train", dtype, shard_tokens) as train,
          ShardWriter(out, "val", dtype, shard_tokens) as val):
        task = bar.add_task("tokenizing", total=sum(f.stat().st_size for f in files))
        stream = _encoded(files, tok, dtype, workers, text_field,
                          lambda size: bar.advance(task, size))
        if single:
            _split_tokens(_with_separators(stream, eot), out, dtype, train, val, val_fraction)
        else:
            _split_documents(_with_separators(stream, eot), train, val, val_fraction)
        if not train.tokens:
            raise CorpusError("no text to tokenize: every document is empty"
                              if not val.tokens else "every document went to validation; "
                              "lower --val-fraction")
    tok.save(out)
    return write_index(out, dtype=dtype, vocab_size=tok.vocab_size, eot_id=eot,
                       splits={"train": train.entry(), "val": val.entry()})


def _bar(enabled: bool) -> Progress:
    """Bytes read so far, on stderr when it is a terminal (else not even a blank line)."""
    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                    transient=True, disable=not (enabled and console.is_terminal))


def _with_separators(stream: Iterator[tuple[bool, np.ndarray]],
                     eot: int | None) -> Iterator[tuple[bool, np.ndarray]]:
    """The separator id put in front of every document's first piece."""
    for starts, ids in stream:
        if starts and eot is not None:
            ids = np.concatenate([np.array([eot], dtype=ids.dtype), ids])
        yield starts, ids


def _split_documents(stream: Iterator[tuple[bool, np.ndarray]], train: ShardWriter,
                     val: ShardWriter, val_fraction: float) -> None:
    document, writer = -1, train
    for starts, ids in stream:
        if starts:
            document += 1
            writer = val if is_validation(document, val_fraction) else train
        writer.write(ids, documents=int(starts))


def _split_tokens(stream: Iterator[tuple[bool, np.ndarray]], out: Path, dtype: np.dtype,
                  train: ShardWriter, val: ShardWriter, val_fraction: float) -> None:
    """One document: all its tokens to a scratch file first, then the last fraction to `val`."""
    scratch = out / ".single-document.tmp"
    try:
        with open(scratch, "wb") as f:
            for _, ids in stream:
                f.write(ids.astype(dtype.newbyteorder("<"), copy=False).tobytes())
        tokens = np.memmap(scratch, dtype=dtype.newbyteorder("<"), mode="r") \
            if scratch.stat().st_size else np.empty(0, dtype)
        cut = int(len(tokens) * (1 - val_fraction))
        for writer, start, end in ((train, 0, cut), (val, cut, len(tokens))):
            for at in range(start, end, COPY_TOKENS):
                writer.write(tokens[at:min(at + COPY_TOKENS, end)], documents=int(at == start))
        del tokens
    finally:
        scratch.unlink(missing_ok=True)


# ------------------------------------------------------------------- encoding in workers
def _batches(files: list[Path], text_field: str) -> Iterator[tuple[str, list[Piece]]]:
    """Pieces grouped into batches of about BATCH_BYTES, never mixing files (for messages)."""
    for path in files:
        batch: list[Piece] = []
        for piece in read_pieces(path, text_field):
            batch.append(piece)
            if sum(p.size for p in batch) >= BATCH_BYTES:
                yield str(path), batch
                batch = []
        if batch:
            yield str(path), batch


def _encoded(files: list[Path], tokenizer: Tokenizer, dtype: np.dtype, workers: int,
             text_field: str, advance: Callable[[int], None]) -> Iterator[tuple[bool, np.ndarray]]:
    """(starts a document, ids) for every piece, in input order, `workers` processes encoding."""
    spec = (tokenizer.backend.to_str(), dtype.name)
    if workers == 1:
        _start_worker(*spec)
        results = ((pieces, _encode(source, [p.text for p in pieces]))
                   for source, pieces in _batches(files, text_field))
        yield from _flatten(results, advance)
        return
    context = multiprocessing.get_context("spawn")  # fork would copy tokenizers' thread pool
    with context.Pool(workers, _start_worker, spec) as pool:
        pending: deque = deque()

        def submitted() -> Iterator[tuple[list[Piece], list[np.ndarray]]]:
            for source, pieces in _batches(files, text_field):
                pending.append((pieces, pool.apply_async(
                    _encode, (source, [p.text for p in pieces]))))
                if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                    yield _collect(pending.popleft())
            while pending:
                yield _collect(pending.popleft())

        yield from _flatten(submitted(), advance)


def _collect(entry: tuple[list[Piece], Any]) -> tuple[list[Piece], list[np.ndarray]]:
    pieces, result = entry
    return pieces, result.get()


def _flatten(results: Iterable[tuple[list[Piece], list[np.ndarray]]],
             advance: Callable[[int], None]) -> Iterator[tuple[bool, np.ndarray]]:
    for pieces, arrays in results:
        for piece, ids in zip(pieces, arrays, strict=True):
            yield piece.starts_document, ids
        advance(sum(p.size for p in pieces))


_worker: tuple[tokenizers.Tokenizer, np.dtype] | None = None


def _start_worker(tokenizer_json: str, dtype: str) -> None:
    """Pool initializer: each worker builds the tokenizer once."""
    global _worker
    _worker = tokenizers.Tokenizer.from_str(tokenizer_json), np.dtype(dtype)


def _encode(source: str, texts: list[str]) -> list[np.ndarray]:
    backend, dtype = _worker
    try:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
    except Exception as e:  # tokenizers raises plain Exception (e.g. a char outside the vocab)
        raise CorpusError(f"{source}: cannot be tokenized ({' '.join(str(e).split())})") from None
    return [np.array(e.ids, dtype=dtype) for e in encodings]
