"""Polynomial hashes of text spans, vectorised: one prefix sum over a text's code points, then
the hash of any span [start, end) in two numpy operations.

Dedup hashes tokens, the quality rules word n-grams, boilerplate detection whole lines; all
run in worker processes, so a hash must depend only on the text (never Python's salted
`hash()`), and all are numpy because Python work per token or line is what limits a pipeline
to a few MB/s. Arithmetic is modulo 2**64 with an odd base, which has an inverse.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

U64 = np.uint64
BASE = U64(0x100000001B3)  # odd, so it has an inverse modulo 2**64
INVERSE = U64(pow(int(BASE), -1, 1 << 64))


@lru_cache(maxsize=2)
def powers(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**i and INVERSE**i for i < 2**bits (kept for the next text: cumprod is slow)."""
    one = np.ones(1, U64)
    return tuple(np.concatenate((one, np.cumprod(np.full((1 << bits) - 1, base, U64))))
                 for base in (BASE, INVERSE))


class SpanHasher:
    """`hasher(starts, ends)`: sum(codes[i] * BASE**(i - start)) over each span, mod 2**64."""

    def __init__(self, codes: np.ndarray) -> None:
        up, self._down = powers(max(16, (codes.size + 1).bit_length()))
        self._prefix = np.zeros(codes.size + 1, U64)
        np.cumsum(codes.astype(U64) * up[:codes.size], out=self._prefix[1:])

    def __call__(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        return (self._prefix[ends] - self._prefix[starts]) * self._down[starts]


def mix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place: a bijection that spreads every input bit."""
    for multiplier in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        h ^= h >> U64(33)
        h *= U64(multiplier)
    h ^= h >> U64(33)
    return h


def line_hashes(lines: list[str]) -> np.ndarray:
    """A uint64 hash of each line (its length mixed in, so spans of different lengths with
    equal sums differ)."""
    if not lines:
        return np.empty(0, U64)
    codes = np.frombuffer("\n".join(lines).encode("utf-32-le", "surrogatepass"), np.uint32)
    lengths = np.fromiter(map(len, lines), np.int64, len(lines))
    ends = np.cumsum(lengths + 1) - 1
    starts = ends - lengths
    return mix(SpanHasher(codes)(starts, ends) + lengths.astype(U64) * U64(0x9E3779B97F4A7C15))
