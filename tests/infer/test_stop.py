"""StopChecker: streamed text is cut at the earliest stop string and never leaks part of one."""

import random

import pytest

from pagoda.errors import InvalidRequestError
from pagoda.infer.stop import StopChecker


def _stream(stop: list[str], chunks: list[str]) -> tuple[str, bool]:
    """Feed chunks until a stop; return everything emitted (flush included) and the stop flag."""
    checker = StopChecker(stop)
    out = []
    for chunk in chunks:
        text, hit = checker.push(chunk)
        out.append(text)
        if hit:
            return "".join(out) + checker.flush(), True
    return "".join(out) + checker.flush(), False


def _reference(stop: list[str], text: str) -> tuple[str, bool]:
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def test_no_stops_passes_through_without_holding_back():
    checker = StopChecker([])
    assert checker.push("<|end") == ("<|end", False)
    assert checker.push("") == ("", False)
    assert checker.flush() == ""


def test_stop_inside_one_chunk_cuts_it():
    checker = StopChecker(["END"])
    assert checker.push("hello END world") == ("hello ", True)
    assert checker.push("more") == ("", True)
    assert checker.flush() == ""


def test_possible_prefix_is_held_until_disambiguated():
    checker = StopChecker(["END"])
    assert checker.push("abcE") == ("abc", False)
    assert checker.push("N") == ("", False)
    assert checker.push("x") == ("ENx", False)
    assert checker.push("EN") == ("", False)
    assert checker.flush() == "EN"


def test_stop_split_across_many_chunks():
    assert _stream(["<|im_end|>"], list("Hi there<|im_end|>ignored")) == ("Hi there", True)


def test_earliest_stop_wins():
    assert _stream(["world", "lo"], ["hello world"]) == ("hel", True)
    # "xy" is held as a possible "xyz" when "b" (listed later) ends the text first
    assert _stream(["xyz", "b"], ["axy", "bxyz"]) == ("axy", True)


def test_overlapping_stop_candidates():
    # "aab" starts one character after a held "a" that turned out not to begin the stop
    assert _stream(["aab"], ["a", "a", "a", "b", "c"]) == ("a", True)


def test_chinese_text():
    assert _stream(["结束"], ["你好", "世界结", "束了吗"]) == ("你好世界", True)
    assert _stream(["。"], ["你好", "吗"]) == ("你好吗", False)


def test_empty_stop_string_is_rejected():
    with pytest.raises(InvalidRequestError, match="non-empty"):
        StopChecker(["ok", ""])


def test_random_chunkings_match_a_whole_text_search():
    rng = random.Random(0)
    alphabet = "ab<|>终止"
    for _ in range(300):
        stop = [
            "".join(rng.choices(alphabet, k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
        ]
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert _stream(stop, chunks) == _reference(stop, text), (stop, chunks)
