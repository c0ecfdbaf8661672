"""Train a tokenizer on text files: byte-level BPE (GPT-2's recipe) or characters (nanoGPT's).

BPE starts from the 256-byte alphabet, so every input is encodable and decoding gives it back
exactly; `<|endoftext|>` (document separator and EOS), `<|im_start|>` and `<|im_end|>` are
reserved as special tokens, and the saved folder carries a ChatML chat template, so a model
trained with it works with `pagoda chat`. The char tokenizer's vocabulary is the sorted set of
the input's characters (65 for tiny Shakespeare); it has no special and no unknown token, so
encoding a character it never saw is an error. Both are plain `tokenizers.Tokenizer`s saved as
tokenizer.json + tokenizer_config.json, loadable with `Tokenizer.from_file(folder)`.

The last `held_out_fraction` of the input bytes is kept out of training and used to measure
compression (bytes per token), next to any reference tokenizers the caller passes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from pagoda.errors import ConfigError
from pagoda.tokenizer.chat import CHATML_TEMPLATE
from pagoda.tokenizer.corpus import CorpusError, corpus_files, read_pieces
from pagoda.tokenizer.tokenizer import Tokenizer

EOT = "<|endoftext|>"
SPECIAL_TOKENS = (EOT, "<|im_start|>", "<|im_end|>")
KINDS = ("bpe", "char")
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)
HELD_OUT_CAP = 8 << 20  # bytes of held-out text kept to measure compression; enough for ±0.1%


@dataclass
class TrainReport:
    """What was trained and how well it compresses held-out text (bytes per token, by name)."""

    kind: str
    vocab_size: int
    out_dir: str
    train_bytes: int
    held_out_bytes: int
    bytes_per_token: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Corpus:
    """The input files split into a training part and a held-out tail (by bytes).

    `train_texts()` streams the training part piece by piece and, on the way, keeps up to
    `HELD_OUT_CAP` bytes of the tail in `held_out` and every character seen in `chars`.
    """

    def __init__(self, files: list[Path], held_out_fraction: float) -> None:
        self.files = files
        total = sum(f.stat().st_size for f in files)
        self.train_bytes = round(total * (1 - held_out_fraction))
        self.held_out: list[str] = []
        self.held_out_bytes = 0
        self.chars: set[str] = set()

    def train_texts(self) -> Iterator[str]:
        seen = 0
        for path in self.files:
            for piece in read_pieces(path):
                self.chars.update(piece.text)
                room = self.train_bytes - seen
                seen += piece.size
                head, tail = _split(piece.text, room / piece.size)
                if head:
                    yield head
                if tail and self.held_out_bytes < HELD_OUT_CAP:
                    self.held_out.append(tail)
                    self.held_out_bytes += len(tail.encode())


def _split(text: str, fraction: float) -> tuple[str, str]:
    """`text` cut after about `fraction` of its bytes, at a character boundary."""
    if fraction >= 1:
        return text, ""
    if fraction <= 0:
        return "", text
    data = text.encode()
    cut = round(len(data) * fraction)
    while cut < len(data) and data[cut] & 0xC0 == 0x80:  # not inside a UTF-8 sequence
        cut += 1
    return data[:cut].decode(), data[cut:].decode()


def train_tokenizer(files: Iterable[str | Path], vocab_size: int | None, out_dir: str | Path,
                    kind: str = "bpe", held_out_fraction: float = 0.01,
                    references: Mapping[str, Tokenizer] | None = None) -> TrainReport:
    """Train on `files`, save to `out_dir`, and compare compression with `references`."""
    started = time.perf_counter()
    if kind not in KINDS:
        raise ConfigError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "bpe" and vocab_size is None:
        raise ConfigError("byte-level BPE needs a vocab size (e.g. 8192)")
    if kind == "bpe" and vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"vocab size {vocab_size} is too small for byte-level BPE: it needs "
                          f"at least {MIN_BPE_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special "
                          "tokens)")
    if not 0 <= held_out_fraction < 1:
        raise ConfigError(f"held-out fraction must be in [0, 1), not {held_out_fraction}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; choose another --out")
    corpus = _Corpus(corpus_files(files), held_out_fraction)
    if kind == "bpe":
        tokenizer = _train_bpe(corpus, vocab_size)
    else:
        tokenizer = _train_char(corpus)
    tokenizer.save(out)
    held_out = corpus.held_out
    compared = {"trained": tokenizer, **(references or {})}
    return TrainReport(
        kind=kind, vocab_size=tokenizer.vocab_size, out_dir=str(out),
        train_bytes=corpus.train_bytes, held_out_bytes=corpus.held_out_bytes,
        bytes_per_token={name: bytes_per_token(t, held_out) for name, t in compared.items()}
        if held_out else {},
        seconds=time.perf_counter() - started)


def _train_bpe(corpus: _Corpus, vocab_size: int) -> Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(corpus.train_texts(), trainer)
    return Tokenizer(backend, bos_token=EOT, eos_token=EOT, chat_template=CHATML_TEMPLATE)


def _train_char(corpus: _Corpus) -> Tokenizer:
    """Characters of the whole input (held-out part included, as nanoGPT does), sorted."""
    for _ in corpus.train_texts():
        pass
    vocab = {char: i for i, char in enumerate(sorted(corpus.chars))}
    if not vocab:
        raise CorpusError("the input has no text to build a character vocabulary from")
    backend = tokenizers.Tokenizer(models.WordLevel(vocab))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend)


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float:
    """UTF-8 bytes of `texts` per token: higher is better compression."""
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    return sum(len(t.encode()) for t in texts) / max(tokens, 1)
