"""A tokenizer-free token count, for when the real tokenizer is out of reach (an embedder behind
an HTTP endpoint, or text to budget before any model is chosen)."""

from __future__ import annotations

import re

# kana, CJK ideographs (with extension A and compatibility forms), hangul syllables
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{CJK}]|[^\W{CJK}]+|[^\w\s]")


def approx_tokens(text: str) -> int:
    """One per CJK character, per word and per punctuation mark (BPE and WordPiece vocabularies
    give about that for English prose and Chinese)."""
    return len(_TOKEN.findall(text))
