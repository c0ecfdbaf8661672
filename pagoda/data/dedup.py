"""Deduplication stage: exact copies and near-duplicates (MinHash LSH) leave the corpus.

Split for parallelism: `signatures(texts, config)` (`signature` for one text) is pure and runs
in worker processes; per text, the 128-bit hash of the normalised text (NFKC, casefolded,
whitespace runs collapsed, punctuation kept), then the MinHash of its shingles. A
`Deduplicator` in the main process checks the records in input order, keeps the first of each
group, and holds the hashes and signatures of kept documents, never their text.

Shingles are n consecutive tokens: words, or single characters in scripts written without
spaces (Chinese, Japanese, Thai, ...). Python work per token (datasketch's `update()` sha1s
each shingle) runs at a few MB/s, so all is numpy over the code points of a batch of texts,
and the sketch is a one-permutation MinHash: one hash per shingle, not `num_perm` (128
permutations cost more than all the rest). The hashes depend only on the text and the seed,
never on the process. One core: 25-35 MB/s in batches of 4 KB texts, 12 MB/s one at a time.

The index is datasketch's `MinHashLSH`: `check` runs at ~50 MB/s (12,000 texts of 4 KB a
second), far above the pipeline's rate, for ~6.5 KB of memory per kept document. Its bands
favour recall (a pair at the threshold is a candidate with probability CANDIDATE_RECALL); the
Jaccard estimate of the two signatures confirms each candidate, which keeps precision high.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

import numpy as np
from datasketch import LeanMinHash, MinHashLSH
from numpy import uint64 as U64

from pagoda.data.hashing import SpanHasher, mix
from pagoda.data.record import Drop, Record
from pagoda.errors import ConfigError

DIGEST_WORDS = 4  # the 128-bit exact hash, as uint32 words at the start of a signature
BATCH_CHARS = 1 << 16  # hashed together: numpy's cost per call is shared, arrays stay in cache
CANDIDATE_RECALL = 0.98
# Scripts written without spaces, where each character is a token: Han (with extensions and
# compatibility ideographs), kana, Thai, Lao, Myanmar, Khmer.
UNSPACED = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3FFFF),
            (0x3040, 0x30FF), (0x31F0, 0x31FF), (0x0E00, 0x0EFF), (0x1000, 0x109F),
            (0x1780, 0x17FF))
OTHER, SPACE, WORD, UNSPACED_CHAR = range(4)  # character classes; tokens are WORD and up


@dataclass(frozen=True)
class DedupConfig:
    """What counts as a duplicate: `threshold` is the Jaccard similarity of the shingle sets
    at and above which a later document is a near-duplicate; `shingle` tokens make a shingle."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    shingle: int = 5
    seed: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ConfigError(f"dedup threshold must be between 0 and 1, got {self.threshold}")
        if not 16 <= self.num_perm <= 4096:
            raise ConfigError(f"dedup num_perm must be between 16 and 4096, got {self.num_perm}")
        if self.shingle < 1:
            raise ConfigError(f"dedup shingle size must be at least 1 token, got {self.shingle}")


@cache
def _char_classes() -> np.ndarray:
    """Class of every code point: letters, digits and marks make words, SPACE is what
    str.split() splits on; planes 4 and up (unassigned, tags, private use) are OTHER."""
    classes = np.zeros(0x110000, dtype=np.uint8)
    classes[[code for code in range(0x40000) if unicodedata.category(chr(code))[0] in "LNM"]] = WORD
    classes[[code for code in range(0x3001) if chr(code).isspace()]] = SPACE
    for low, high in UNSPACED:
        block = classes[low:high + 1]
        block[block == WORD] = UNSPACED_CHAR
    return classes


@cache
def _hash_parameters(shingle: int, num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Odd multipliers for a shingle's token positions; the side an empty MinHash bin borrows."""
    random = np.random.RandomState(seed)  # a stream numpy keeps stable across versions
    position = random.randint(0, 1 << 63, shingle, dtype=U64) * U64(2) + U64(1)
    return position, random.randint(0, 2, num_perm).astype(bool)


def _digests(codes: np.ndarray, space: np.ndarray, doc_starts: np.ndarray,
             doc_ends: np.ndarray) -> list[np.ndarray]:
    """BLAKE2b-128 of each document with its whitespace runs collapsed to one space, stripped
    (numpy over the batch: `" ".join(text.split())` makes an object per word)."""
    kept = ~space
    kept[1:] |= ~space[:-1]  # a whitespace run is kept as its first character, made " "
    text = np.where(space, np.uint32(32), codes)[kept].tobytes().decode("utf-32-le",
                                                                       "surrogatepass")
    before = np.zeros(codes.size + 1, np.intp)  # characters kept before each position
    np.cumsum(kept, out=before[1:])
    digests = []
    for start, end in zip(before[doc_starts].tolist(), before[doc_ends].tolist(), strict=True):
        data = text[start:end].strip(" ").encode("utf-8", "surrogatepass")
        digests.append(np.frombuffer(hashlib.blake2b(data, digest_size=16).digest(), np.uint32))
    return digests


def _token_hashes(codes: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each token starts, and its polynomial hash sum(c_i * B^i) over its characters,
    from one prefix sum over all the code points."""
    in_token = classes >= WORD
    word = classes == WORD
    joined = word[:-1] & word[1:]  # characters i and i + 1 are in one word
    starts, ends = in_token.copy(), in_token.copy()
    starts[1:] &= ~joined
    ends[:-1] &= ~joined
    first, last = np.flatnonzero(starts), np.flatnonzero(ends)
    return first, SpanHasher(codes)(first, last + 1)


def _shingle_hashes(tokens: np.ndarray, token_docs: np.ndarray, docs: int,
                    position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hash and document of every shingle: n consecutive tokens of one document, or all the
    tokens of a shorter document. Zeros after each document's tokens end its windows."""
    gap = position.size - 1
    index = np.arange(tokens.size)
    slots = index + token_docs * gap
    padded = np.zeros(tokens.size + docs * gap, U64)
    padded[slots] = tokens
    windows = padded[:padded.size - gap] * position[0]
    for k in range(1, position.size):
        windows += padded[k:k + windows.size] * position[k]
    counts = np.bincount(token_docs, minlength=docs)
    doc_end = np.cumsum(counts)[token_docs]  # the index after the document's last token
    whole = (index + position.size <= doc_end) | (index == doc_end - counts[token_docs])
    return mix(windows[slots[whole]]), token_docs[whole]


def _minhashes(shingles: np.ndarray, shingle_docs: np.ndarray, docs: int,
               borrow_right: np.ndarray) -> np.ndarray:
    """One-permutation MinHash, a row per document (junk for one without shingles): the hash
    of a shingle picks its bin (high bits) and value (low 32 bits); a bin keeps its lowest
    value, an empty bin its nearest filled neighbour's, on the side fixed for that bin. A bin
    of two documents agrees with probability equal to their Jaccard similarity (Shrivastava &
    Li, "Improved densification of one permutation hashing", 2014)."""
    num_bins = borrow_right.size
    bins = (shingles >> U64(32)) * U64(num_bins) >> U64(32)
    groups = shingle_docs.astype(U64) * U64(num_bins) + bins  # (document, bin) as one number
    keyed = np.sort(groups << U64(32) | shingles & U64(0xFFFFFFFF))  # by group, then value
    groups = keyed >> U64(32)
    lowest = np.ones(keyed.size, dtype=bool)
    np.not_equal(groups[1:], groups[:-1], out=lowest[1:])
    filled, values = groups[lowest], keyed[lowest].astype(np.uint32)
    every_group = np.arange(docs * num_bins, dtype=U64).reshape(docs, num_bins)
    doc_first = np.searchsorted(filled, every_group[:, :1])
    doc_stop = np.searchsorted(filled, every_group[:, :1] + U64(num_bins))
    right = np.searchsorted(filled, every_group)
    right = np.where(right < doc_stop, right, doc_first)
    left = np.searchsorted(filled, every_group, side="right") - 1
    left = np.where(left >= doc_first, left, doc_stop - 1)
    return np.take(values, np.where(borrow_right, right, left), mode="clip")


def _batch_signatures(texts: list[str], config: DedupConfig) -> list[np.ndarray]:
    normalised = [unicodedata.normalize("NFKC", text).casefold() for text in texts]
    # one string for the batch: the newlines between documents keep their tokens apart
    codes = np.frombuffer("\n".join(normalised).encode("utf-32-le", "surrogatepass"), np.uint32)
    classes = np.take(_char_classes(), codes)
    lengths = np.array([len(text) for text in normalised])
    doc_starts = np.cumsum(lengths + 1) - lengths - 1
    digests = _digests(codes, classes == SPACE, doc_starts, doc_starts + lengths)
    if not config.near:
        return digests
    first, tokens = _token_hashes(codes, classes)
    if not tokens.size:
        return digests
    token_docs = np.searchsorted(doc_starts, first, side="right") - 1
    position, borrow_right = _hash_parameters(config.shingle, config.num_perm, config.seed)
    minhashes = _minhashes(*_shingle_hashes(tokens, token_docs, len(texts), position),
                           len(texts), borrow_right)
    has_words = np.bincount(token_docs, minlength=len(texts)) > 0
    return [np.concatenate([digest, minhash]) if words else digest
            for digest, minhash, words in zip(digests, minhashes, has_words, strict=True)]


def signatures(texts: Iterable[str], config: DedupConfig) -> list[np.ndarray]:
    """`signature` of each text, hashed in batches of about BATCH_CHARS characters: for one
    short text, numpy's cost per call is most of the work."""
    result: list[np.ndarray] = []
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text) + 1
        if size >= BATCH_CHARS:
            result += _batch_signatures(batch, config)
            batch, size = [], 0
    return result + _batch_signatures(batch, config) if batch else result


def signature(text: str, config: DedupConfig) -> np.ndarray:
    """uint32 words: the 128-bit hash of the normalised text, then the MinHash of its shingles
    (`num_perm` words; none when `config.near` is off or the text has no words)."""
    return _batch_signatures([text], config)[0]


def _bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows): the longest bands that make a pair at the threshold a candidate with
    probability CANDIDATE_RECALL (datasketch's own choice misses 30% at Jaccard 0.85; a false
    candidate only costs one signature comparison)."""
    rows = max((r for r in range(1, num_perm // 2 + 1)
                if 1 - (1 - threshold**r) ** (num_perm // r) >= CANDIDATE_RECALL), default=1)
    return num_perm // rows, rows


class Deduplicator:
    """First seen wins: `check` each record, in input order, with its `signature`."""

    def __init__(self, config: DedupConfig | None = None) -> None:
        self.config = config or DedupConfig()
        self._digests: set[bytes] = set()
        self._minhashes: list[np.ndarray] = []  # of kept documents; the index is the LSH key
        self._index = MinHashLSH(threshold=self.config.threshold, num_perm=self.config.num_perm,
                                 params=_bands(self.config.threshold, self.config.num_perm))

    def check(self, record: Record, signature: np.ndarray) -> Record | Drop:
        """The record with step "dedup" appended, or a Drop if an earlier record was (nearly)
        the same text."""
        digest, minhash = signature[:DIGEST_WORDS].tobytes(), signature[DIGEST_WORDS:]
        if self.config.exact and digest in self._digests:
            return Drop("dedup", "exact duplicate")
        if self.config.near and minhash.size:
            # the scheme is only a label, which datasketch checks is the same across the index
            sketch = LeanMinHash(seed=self.config.seed, hashvalues=minhash, scheme="affine32")
            needed = self.config.threshold * self.config.num_perm
            if any(np.count_nonzero(self._minhashes[key] == minhash) >= needed
                   for key in self._index.query(sketch)):
                return Drop("dedup", "near duplicate")
            self._index.insert(len(self._minhashes), sketch, check_duplication=False)
            self._minhashes.append(minhash.copy())  # not a view keeping a larger array alive
        if self.config.exact:
            self._digests.add(digest)
        return record.evolve("dedup")
