"""Deduplication: near-duplicates caught and distinct texts kept (measured against the true
shingle Jaccard), exact copies after normalisation, first seen wins, the same signatures in
every process and batch."""

from __future__ import annotations

import multiprocessing
import random
import re
import tracemalloc
import unicodedata
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from pagoda.data.dedup import DedupConfig, Deduplicator, signature, signatures
from pagoda.data.record import Drop, Record
from pagoda.errors import ConfigError

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare/input.txt"
# The tokens of the stage for the texts here (ASCII prose, Chinese): letter and digit runs,
# single Han characters.
TOKEN = re.compile(r"[\u4e00-\u9fff]|[^\W_\u4e00-\u9fff]+")


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    tokens = TOKEN.findall(text.casefold())
    return {tuple(tokens[i:i + n]) for i in range(max(1, len(tokens) - n + 1))}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def dedup(texts: list[str], config: DedupConfig | None = None) -> list[Record | Drop]:
    """Each text's outcome, in order, through one Deduplicator."""
    config = config or DedupConfig()
    deduplicator = Deduplicator(config)
    return [deduplicator.check(Record(text, f"doc{i}"), sig)
            for i, (text, sig) in enumerate(zip(texts, signatures(texts, config), strict=True))]


def edit(words: list[str], kind: str, size: int, foreign: list[str],
         rng: random.Random) -> list[str]:
    """`words` with one contiguous span edited: `size` words deleted, `size` foreign words
    appended, or `size` words replaced by foreign ones."""
    at = rng.randrange(len(words) - size)
    other = rng.randrange(len(foreign) - size)
    new = foreign[other:other + size]
    return {"delete": words[:at] + words[at + size:], "append": words + new,
            "replace": words[:at] + new + words[at + size:]}[kind]


@pytest.fixture(scope="module")
def shakespeare() -> list[str]:
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is missing (shared/ data beside the checkout)")
    return SHAKESPEARE.read_text().split()


def test_near_duplicates_caught_and_distinct_texts_kept(shakespeare):
    """300 documents of 300 words from disjoint parts of Shakespeare; 150 near-duplicates, each
    with ~10% edited as one span (so ~90% of the shingles shared: deleting or appending 30
    words, or replacing 15, which also breaks the shingles across the span's edges); 75
    related but distinct variants with a quarter of their words replaced (Jaccard ~0.6)."""
    rng = random.Random(7)
    originals = [shakespeare[i * 300:(i + 1) * 300] for i in range(300)]
    foreign = shakespeare[120_000:]
    near = [(" ".join(edit(originals[i], kind, size, foreign, rng)), i)
            for i, (kind, size) in zip(range(0, 300, 2),
                                       [("delete", 30), ("append", 30), ("replace", 15)] * 50,
                                       strict=True)]
    related = [(" ".join(edit(originals[i], "replace", 75, foreign, rng)), i)
               for i in range(1, 300, 4)]
    texts = [" ".join(words) for words in originals]

    near_jaccard = [jaccard(texts[i], text) for text, i in near]
    assert 0.82 <= min(near_jaccard) and max(near_jaccard) <= 0.95
    assert 0.86 <= np.mean(near_jaccard) <= 0.92
    assert all(0.45 <= jaccard(texts[i], text) <= 0.7 for text, i in related)
    shared = defaultdict(int)  # shingles two originals have in common, by pair
    holders = defaultdict(list)
    for doc, text in enumerate(texts):
        for shingle in shingles(text):
            holders[shingle].append(doc)
    for docs in holders.values():
        for pair in combinations(docs, 2):
            shared[pair] += 1
    assert max(shared.values(), default=0) < 30  # < 0.05 Jaccard between any two originals

    variants = near + related
    rng.shuffle(variants)
    is_near = [False] * len(texts) + [(text, i) in near for text, i in variants]
    outcomes = dedup(texts + [text for text, _ in variants])
    dropped = [isinstance(outcome, Drop) for outcome in outcomes]
    caught = sum(d and n for d, n in zip(dropped, is_near, strict=True))
    recall, precision = caught / len(near), caught / sum(dropped)
    distinct_kept = 1 - sum(d and not n for d, n in zip(dropped, is_near, strict=True)) / (
        len(is_near) - len(near))
    assert recall >= 0.95 and precision >= 0.99 and distinct_kept >= 0.99, (
        recall, precision, distinct_kept)
    assert {o.reason for o in outcomes if isinstance(o, Drop)} == {"near duplicate"}


def test_threshold_decides():
    rng = random.Random(3)
    words = [f"w{rng.randrange(10_000)}" for _ in range(400)]
    text, edited = " ".join(words), " ".join(words[:200] + words[240:])  # Jaccard ~0.88
    assert 0.85 < jaccard(text, edited) < 0.9
    assert isinstance(dedup([text, edited], DedupConfig(threshold=0.8))[1], Drop)
    assert isinstance(dedup([text, edited], DedupConfig(threshold=0.95))[1], Record)


def test_chinese_near_duplicates_caught():
    """Text without spaces is shingled by character: a sentence edited in a Chinese document
    leaves a near-duplicate, as a sentence does in English."""
    rng = random.Random(5)
    han = [chr(code) for code in range(0x4E00, 0x4E00 + 3000)]

    def sentence() -> str:
        return "".join(rng.choices(han, k=rng.randrange(10, 20))) + rng.choice("，。；！？")

    documents = [[sentence() for _ in range(20)] for _ in range(40)]
    texts = ["".join(sentences) for sentences in documents]
    near = []
    for sentences in documents[:20]:
        at = rng.randrange(1, 19)
        if at % 2:  # two sentences deleted or two appended, ~10% of the text
            near.append("".join(sentences[:at] + sentences[at + 2:]))
        else:
            near.append("".join(sentences + [sentence(), sentence()]))
    assert all(0.82 <= jaccard(text, other) <= 0.95
               for text, other in zip(texts[:20], near, strict=True))

    outcomes = dedup(texts + near)
    assert all(isinstance(outcome, Record) for outcome in outcomes[:40])
    assert sum(isinstance(outcome, Drop) for outcome in outcomes[40:]) >= 19


def test_exact_duplicates_after_normalisation():
    same = ["Hello,   World!\n", "hello, world!", " HELLO,\tworld! ",
            "ＨＥＬＬＯ，　ＷＯＲＬＤ！", "Hello,\u2028World!\u3000"]
    assert [type(o) for o in dedup(same)] == [Record] + [Drop] * 4
    assert {o.reason for o in dedup(same)[1:]} == {"exact duplicate"}
    # punctuation is kept: not an exact copy, though the same words make it a near-duplicate
    exact_only = DedupConfig(near=False)
    assert [type(o) for o in dedup(["hello, world", "hello world"], exact_only)] == [Record] * 2
    assert dedup(["hello, world", "hello world"])[1] == Drop("dedup", "near duplicate")


def test_exact_dedup_is_the_collapsed_normalised_text():
    """Against the definition on random texts full of whitespace, case and width variants."""
    rng = random.Random(11)
    alphabet = ["a", "A", "ａ", "b", ",", " ", "  ", "\t", "\n", "\u3000", "\u2028", "\x85", "é",
                "e\u0301"]
    texts = ["".join(rng.choices(alphabet, k=rng.randrange(0, 6))) for _ in range(3000)]
    seen, expected = set(), []
    for text in texts:
        key = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
        expected.append(key not in seen)
        seen.add(key)
    kept = [isinstance(o, Record) for o in dedup(texts, DedupConfig(near=False))]
    assert kept == expected and 10 < sum(kept) < 2000


def test_short_texts_have_one_shingle_and_wordless_ones_no_sketch():
    outcomes = dedup(["To be or", "to be, or!", "to be nor", "", "   ", "!!!", "???"])
    assert [type(o) for o in outcomes] == [Record, Drop, Record, Record, Drop, Record, Record]
    assert [o.reason for o in outcomes if isinstance(o, Drop)] == ["near duplicate",
                                                                   "exact duplicate"]


def test_first_seen_wins_and_the_lineage():
    rng = random.Random(2)
    words = [f"w{rng.randrange(10_000)}" for _ in range(300)]
    original, near = " ".join(words), " ".join(words[:-20])
    other = " ".join(f"v{rng.randrange(10_000)}" for _ in range(300))
    record = Record(original, "a.txt", meta={"lang": "en"}, steps=("clean",))
    deduplicator = Deduplicator()
    config = deduplicator.config
    kept = deduplicator.check(record, signature(original, config))
    assert kept == Record(original, "a.txt", meta={"lang": "en"}, steps=("clean", "dedup"))
    assert deduplicator.check(Record(near, "b"), signature(near, config)) == Drop(
        "dedup", "near duplicate")
    assert isinstance(deduplicator.check(Record(other, "c"), signature(other, config)), Record)
    assert deduplicator.check(Record(original, "d"), signature(original, config)) == Drop(
        "dedup", "exact duplicate")
    assert [type(o) for o in dedup([near, original, other])] == [Record, Drop, Record]


def test_memory_grows_by_hashes_not_text():
    deduplicator, config = Deduplicator(), DedupConfig()
    deduplicator.check(Record("warm up", "x"), signature("warm up", config))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(200):  # distinct 16 KB texts, made and dropped here: what check() keeps stays
        text = f"{i} {'x' * 16_000}"
        assert isinstance(deduplicator.check(Record(text, str(i)), signature(text, config)), Record)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown / 200 < 8_000


# wordless, short, Chinese, mixed scripts, longer than a batch, accents, a lone surrogate
MIXED = ["", "   ", "!!!", "a", "a b c", "Hello, World!", "我爱北京天安门。", "abc中文def ghi",
         "x " * 40_000, "naïve café ÉCOLE", "\ud800 lone surrogate", "tab\tsep\u2028line"]


def test_batches_give_the_same_signatures_as_one_text_at_a_time():
    config = DedupConfig(num_perm=64, shingle=3)
    batched = signatures(MIXED * 3, config)
    assert all(np.array_equal(sig, signature(text, config))
               for sig, text in zip(batched, MIXED * 3, strict=True))
    assert [b.size for b in batched[:len(MIXED)]] == [4, 4, 4] + [68] * (len(MIXED) - 3)
    assert signatures(MIXED, DedupConfig(near=False))[5].size == 4


def test_signatures_are_the_same_in_another_process(monkeypatch):
    """A spawned interpreter with another str hash seed computes the same signatures."""
    monkeypatch.setenv("PYTHONHASHSEED", "12345")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        theirs = pool.apply(signatures, (MIXED, DedupConfig()))
    ours = signatures(MIXED, DedupConfig())
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("bad", [{"threshold": 0}, {"threshold": 1}, {"threshold": 1.5},
                                 {"num_perm": 8}, {"num_perm": 10_000}, {"shingle": 0}])
def test_config_errors(bad):
    with pytest.raises(ConfigError, match="dedup"):
        DedupConfig(**bad)
