"""Chat data for supervised fine-tuning: read conversations, encode them, pack them into batches.

Three common record formats are detected per record, so one file may mix them:

    OpenAI    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}
    ShareGPT  {"conversations": [{"from": "system"|"human"|"gpt"|"user"|"assistant", "value": "..."}]}
    Alpaca    {"instruction": "...", "input": "..." (optional), "output": "...", "system": "..." (optional)}

Files are `.jsonl` (one record per line) or `.json` (one list of records); a bad record stops
the read with `file:line: what is wrong`. Conversations are rendered with the model's own chat
template (`encode_chat`) and only assistant tokens are trained: `labels` equal `ids` there and
`IGNORE` elsewhere, aligned with `ids` (the loss shifts). Packing puts whole examples side by
side in one row, each its own segment with positions restarting at 0, and the model's segment
mask keeps them from seeing each other, so a packed batch trains exactly as the unpacked one.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.errors import ConfigError, InvalidRequestError, PagodaError
from pagoda.tokenizer.chat import encode_chat
from pagoda.tokenizer.tokenizer import Tokenizer
from pagoda.train.objectives import IGNORE, token_loss

__all__ = [
    "IGNORE", "DatasetError", "EncodeReport", "SftBatch", "SftExample", "encode_conversations",
    "encode_with_report", "pack_rows", "parse_record", "read_conversations", "sft_batches",
    "sft_loss", "split_examples",
]

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json")
OPENAI_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}

Conversation = list[dict[str, str]]


class DatasetError(PagodaError):
    """A fine-tuning data file is missing, empty, or has a malformed record (named file:line)."""


# ------------------------------------------------------------------ reading
def read_conversations(path: str | Path) -> list[Conversation]:
    """Every record of a .jsonl/.json chat file as a list of {role, content} messages."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot be read as UTF-8 text ({e})") from None
    records = _jsonl_records(path, text) if path.suffix == ".jsonl" else _json_records(path, text)
    conversations = [parse_record(record, f"{path}:{line}") for line, record in records]
    if not conversations:
        raise DatasetError(f"{path}: the file holds no records")
    return conversations


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None


def _json_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line where it starts, record) for each element of a top-level JSON list."""
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line(i: int) -> int:
        return text.count("\n", 0, i) + 1

    def bad(i: int, what: str) -> DatasetError:
        return DatasetError(f"{path}:{line(i)}: {what}")

    i = skip(0)
    if i == len(text):
        return  # an empty file: the caller reports that it holds no records
    if text[i] != "[":
        raise bad(i, "a .json file must hold one list of records (use .jsonl for one per line)")
    i = skip(i + 1)
    empty = i < len(text) and text[i] == "]"
    while not empty:
        try:  # after '[' or ',' a value must come: raw_decode refuses ']' or the end of text
            record, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        yield line(i), record
        i = skip(end)
        if i < len(text) and text[i] == "]":
            break
        if i >= len(text) or text[i] != ",":
            raise bad(i, "invalid JSON (expected ',' or ']' after a record)")
        i = skip(i + 1)
    if skip(i + 1) != len(text):
        raise bad(skip(i + 1), "invalid JSON (text after the closing ']')")


def parse_record(record: Any, where: str) -> Conversation:
    """One record in any supported format -> validated messages; `where` is 'file:line'."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    if "messages" in record:
        chat = _messages(record["messages"], OPENAI, where)
    elif "conversations" in record:
        chat = _messages(record["conversations"], SHAREGPT, where)
    elif "instruction" in record and "output" in record:
        chat = _alpaca(record, where)
    else:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DatasetError(f"{where}: unknown record format (keys: {keys}); expected 'messages' "
                           "(OpenAI), 'conversations' (ShareGPT) or 'instruction' + 'output' "
                           "(Alpaca)")
    if not any(m["role"] == "assistant" for m in chat):
        raise DatasetError(f"{where}: the conversation has no assistant turn to train on")
    return chat


def _turns(value: Any, fmt: str, key: str, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise DatasetError(f"{where}: {fmt} '{key}' must be a list of messages, "
                           f"not {type(value).__name__}")
    if not value:
        raise DatasetError(f"{where}: empty conversation ({fmt} '{key}' is an empty list)")
    return value


def _text(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {what} must be a string, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class _Format:
    """How one chat format spells its turns: list key, role and text keys, role names."""

    name: str
    turns: str
    role: str
    text: str
    roles: dict[str, str]  # the format's role name -> ours
    expected: str  # the role names, as an error lists them


OPENAI = _Format("OpenAI", "messages", "role", "content", {r: r for r in OPENAI_ROLES},
                 ", ".join(OPENAI_ROLES))
SHAREGPT = _Format("ShareGPT", "conversations", "from", "value", SHAREGPT_ROLES,
                   "human, gpt, system (or user, assistant)")


def _messages(turns: Any, fmt: _Format, where: str) -> Conversation:
    """A record's turn list in format `fmt` -> our {role, content} messages, validated."""
    chat = []
    for n, turn in enumerate(_turns(turns, fmt.name, fmt.turns, where), start=1):
        if not isinstance(turn, dict):
            raise DatasetError(f"{where}: {fmt.name} message {n} must be an object with "
                               f"'{fmt.role}' and '{fmt.text}', not {type(turn).__name__}")
        name = turn.get(fmt.role)
        role = fmt.roles.get(name) if isinstance(name, str) else None
        if role is None:
            raise DatasetError(f"{where}: {fmt.name} message {n} has role {name!r}; expected "
                               f"{fmt.expected}")
        chat.append({"role": role, "content": _text(turn.get(fmt.text),
                                                    f"{fmt.name} message {n} {fmt.text}", where)})
    return chat


def _alpaca(record: dict[str, Any], where: str) -> Conversation:
    instruction = _text(record["instruction"], "Alpaca 'instruction'", where)
    extra = _text(record.get("input") or "", "Alpaca 'input'", where)
    output = _text(record["output"], "Alpaca 'output'", where)
    if not instruction.strip():
        raise DatasetError(f"{where}: Alpaca 'instruction' is empty")
    chat = []
    if record.get("system"):
        chat.append({"role": "system", "content": _text(record["system"], "Alpaca 'system'",
                                                        where)})
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [*chat, {"role": "user", "content": user}, {"role": "assistant", "content": output}]


# ------------------------------------------------------------------ encoding
@dataclass
class SftExample:
    """One tokenized conversation; labels[i] == IGNORE where token i is not trained."""

    ids: list[int]
    labels: list[int]  # aligned with ids (not shifted): the loss shifts


@dataclass
class EncodeReport:
    """What encoding did to the conversations (the loop prints it)."""

    conversations: int = 0
    examples: int = 0
    truncated: int = 0  # longer than max_len, cut to its first max_len tokens and kept
    skipped: int = 0  # no trained token left after truncation
    tokens: int = 0
    trained_tokens: int = 0

    def __str__(self) -> str:
        return (f"{self.examples} examples from {self.conversations} conversations "
                f"({self.truncated} truncated, {self.skipped} skipped with nothing left to "
                f"train); {self.tokens} tokens, {self.trained_tokens} trained")


def encode_with_report(tokenizer: Tokenizer, conversations: Sequence[Conversation],
                       max_len: int) -> tuple[list[SftExample], EncodeReport]:
    """`encode_conversations` plus counts of truncated and skipped conversations."""
    if max_len < 2:
        raise ConfigError(f"max_len must be at least 2 tokens, not {max_len}")
    report = EncodeReport(conversations=len(conversations))
    examples = []
    for n, chat in enumerate(conversations):
        try:
            encoding = encode_chat(tokenizer, chat)
        except InvalidRequestError as e:
            raise DatasetError(f"conversation {n}: {e}") from None
        labels = [i if keep else IGNORE for i, keep in zip(encoding.ids, encoding.assistant_mask,
                                                           strict=True)]
        ids = encoding.ids
        if len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            report.truncated += 1
        # Label 0 is never predicted (nothing precedes it), so it does not count as trained.
        if all(label == IGNORE for label in labels[1:]):
            report.skipped += 1
            continue
        examples.append(SftExample(ids=list(ids), labels=labels))
        report.tokens += len(ids)
        report.trained_tokens += sum(label != IGNORE for label in labels[1:])
    report.examples = len(examples)
    return examples, report


def encode_conversations(tokenizer: Tokenizer, conversations: Sequence[Conversation],
                         max_len: int) -> list[SftExample]:
    """Render and tokenize each conversation; truncate to max_len, drop ones left untrained."""
    examples, report = encode_with_report(tokenizer, conversations, max_len)
    log.info("encoded %s", report)
    return examples


def split_examples(examples: Sequence[SftExample], val_fraction: float,
                   seed: int) -> tuple[list[SftExample], list[SftExample]]:
    """(train, val): a seeded random `val_fraction` held out; both keep the input order."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), not {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(1, round(len(examples) * val_fraction))
    if n_val and n_val >= len(examples):
        raise DatasetError(f"cannot hold out {val_fraction:.0%} for validation from "
                           f"{len(examples)} examples: no training example would be left")
    held = set(random.Random(seed).sample(range(len(examples)), n_val))
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [e for i, e in enumerate(examples) if i in held]
    return train, val


# ------------------------------------------------------------------ batching
@dataclass
class SftBatch:
    """Rows of whole examples; segment 0 is padding, packed examples are segments 1, 2, ..."""

    ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, IGNORE on padding, prompts and each segment's first token
    positions: torch.Tensor  # (B, T) long, restarting at 0 in each segment
    segments: torch.Tensor  # (B, T) long

    def to(self, device: torch.device | str) -> SftBatch:
        return SftBatch(*(t.to(device, non_blocking=True) for t in
                          (self.ids, self.labels, self.positions, self.segments)))

    @property
    def trained_tokens(self) -> int:
        """Number of label positions the loss counts (tokens per step, for throughput)."""
        return int(self.labels.ne(IGNORE).sum())


class _FirstFit:
    """Rows of capacity `size`; `place(n)` returns the first row with room for n (a new one if
    none has), in O(log rows) through a max-tree over the rooms left."""

    def __init__(self, max_rows: int, size: int) -> None:
        self.leaves = 1
        while self.leaves < max(1, max_rows):
            self.leaves *= 2
        self.room = [size] * (2 * self.leaves)  # every unused row is empty: full room

    def place(self, n: int) -> int:
        node = 1
        while node < self.leaves:  # descend to the leftmost leaf with room >= n
            node = 2 * node if self.room[2 * node] >= n else 2 * node + 1
        row = node - self.leaves
        self.room[node] -= n
        node //= 2
        while node:
            self.room[node] = max(self.room[2 * node], self.room[2 * node + 1])
            node //= 2
        return row


def pack_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` grouped into rows of at most seq_len tokens."""
    fit = _FirstFit(len(lengths), seq_len)
    rows: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable on ties
        row = fit.place(lengths[index])
        if row == len(rows):
            rows.append([])
        rows[row].append(index)
    return rows


def sft_batches(examples: Sequence[SftExample], seq_len: int, batch_size: int, pack: bool = True,
                seed: int = 0) -> list[SftBatch]:
    """One epoch of batches, shuffled by `seed`; each batch is padded to its longest row.

    pack=True puts several whole examples in a row (never splitting one); pack=False gives each
    example its own row. The last batch may be smaller than batch_size.
    """
    if seq_len < 2 or batch_size < 1:
        raise ConfigError(f"need seq_len >= 2 and batch_size >= 1, not {seq_len} and {batch_size}")
    if not examples:
        raise DatasetError("no examples to batch")
    for n, example in enumerate(examples):
        if len(example.ids) > seq_len:
            raise ConfigError(f"example {n} has {len(example.ids)} tokens, more than seq_len "
                              f"{seq_len}; encode with max_len <= seq_len")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)  # ties in length are packed in a seeded order
    if pack:
        rows = [[order[i] for i in row]
                for row in pack_rows([len(examples[i].ids) for i in order], seq_len)]
        rng.shuffle(rows)
    else:
        rows = [[i] for i in order]
    return [_collate([[examples[i] for i in row] for row in rows[start:start + batch_size]])
            for start in range(0, len(rows), batch_size)]


def _collate(rows: list[list[SftExample]]) -> SftBatch:
    T = max(sum(len(e.ids) for e in row) for row in rows)
    shape = (len(rows), T)
    ids = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for segment, example in enumerate(row, start=1):
            stop = start + len(example.ids)
            ids[r, start:stop] = torch.tensor(example.ids)
            labels[r, start:stop] = torch.tensor(example.labels)
            labels[r, start] = IGNORE  # nothing in its segment precedes it
            positions[r, start:stop] = torch.arange(stop - start)
            segments[r, start:stop] = segment
            start = stop
    return SftBatch(ids=ids, labels=labels, positions=positions, segments=segments)


# ------------------------------------------------------------------ loss
def sft_loss(model: nn.Module, batch: SftBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over trained tokens; never across a segment boundary.

    `model` is any module whose forward takes (ids, positions=, segments=, keep=) and returns
    logits (a Transformer, with or without adapters, or a wrapper); `keep` is a (B, T) bool mask
    of the positions to score (see Transformer.forward). MoE load balancing is the caller's.
    """
    device = _device(model)
    if device is not None and batch.ids.device != device:
        batch = batch.to(device)
    targets = batch.labels[:, 1:].masked_fill(batch.segments[:, 1:] != batch.segments[:, :-1],
                                              IGNORE)  # (B, T-1)
    trained = targets.ne(IGNORE)  # (B, T-1)
    # logits only where a label is: prompts and padding never reach the vocabulary product
    logits = model(batch.ids, positions=batch.positions, segments=batch.segments,
                   keep=F.pad(trained, (0, 1)))  # (1, N, V)
    if not logits.numel():  # cross_entropy would return nan; keep the graph alive
        return logits.sum() * 0.0
    return token_loss(logits, targets[trained].unsqueeze(0))


def _device(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None
