"""Tokenizer training: byte-level BPE and characters, exact round trips, held-out compression,
one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagoda.errors import ConfigError
from pagoda.tokenizer import Tokenizer, render_chat
from pagoda.tokenizer.corpus import CorpusError
from pagoda.tokenizer.train import SPECIAL_TOKENS, _Corpus, train_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare/input.txt"
SAMPLES = ["Hello,  world!\n\tIndented", "你好，世界。知识库", "emoji 🙂👍🏽 ok",
           "def f(x):\n    return x ** 2  # code", "<|im_start|>user\nhi<|im_end|>", " \n\n  "]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> tuple[Tokenizer, object]:
    out = tmp_path_factory.mktemp("bpe")
    report = train_tokenizer([SHAKESPEARE], 600, out)
    return Tokenizer.from_file(out), report


def test_bpe_round_trips_any_text_and_reserves_chat_tokens(bpe):
    tokenizer, report = bpe
    assert report.vocab_size == tokenizer.vocab_size == 600
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    for text in SAMPLES:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_end|>") == [2]
    assert tokenizer.eos_id == 0 and {0, 2} <= tokenizer.eos_ids
    assert render_chat(tokenizer, [{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_bpe_reports_compression_on_held_out_text(bpe, tmp_path):
    _, report = bpe
    total = SHAKESPEARE.stat().st_size
    assert report.train_bytes == round(total * 0.99)
    assert report.held_out_bytes == total - report.train_bytes
    assert 1.5 < report.bytes_per_token["trained"] < 4
    char = Tokenizer.from_file(train_tokenizer([SHAKESPEARE], None, tmp_path, kind="char").out_dir)
    again = train_tokenizer([SHAKESPEARE], 300, tmp_path / "b", references={"char": char})
    assert again.bytes_per_token["char"] == pytest.approx(1.0)


def test_held_out_tail_is_kept_out_of_training(tmp_path):
    text = "ab\n" * 300 + "ünïcödé tail\n" * 100
    path = tmp_path / "t.txt"
    path.write_text(text)
    corpus = _Corpus([path], 0.25)
    trained = "".join(corpus.train_texts())
    assert trained + "".join(corpus.held_out) == text
    assert len(trained.encode()) == pytest.approx(0.75 * len(text.encode()), abs=2)


def test_char_tokenizer_is_nanogpts(tmp_path):
    report = train_tokenizer([SHAKESPEARE], None, tmp_path, kind="char")
    tokenizer = Tokenizer.from_file(tmp_path)
    assert report.vocab_size == tokenizer.vocab_size == 65
    assert tokenizer.encode("First Citizen") == [18, 47, 56, 57, 58, 1, 15, 47, 58, 47, 64, 43, 52]
    text = SHAKESPEARE.read_text()[:5000]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    with pytest.raises(Exception, match="UNK"):  # no unknown token: unseen characters fail
        tokenizer.encode("你")


@pytest.mark.parametrize("case, error, match", [
    ("missing", CorpusError, "no such file"),
    ("empty", CorpusError, "is empty"),
    ("small", ConfigError, "at least 259"),
    ("none", ConfigError, "needs a vocab size"),
    ("out_file", ConfigError, "not a folder"),
    ("kind", ConfigError, "unknown tokenizer kind"),
])
def test_bad_input_is_one_clear_error(tmp_path, case, error, match):
    good = tmp_path / "good.txt"
    good.write_text("some text\n")
    (tmp_path / "empty.txt").touch()
    (tmp_path / "file").touch()
    args = {"files": [good], "vocab_size": 300, "out_dir": tmp_path / "out", "kind": "bpe"}
    args.update({"missing": {"files": [tmp_path / "nope.txt"]},
                 "empty": {"files": [tmp_path / "empty.txt"]},
                 "small": {"vocab_size": 258}, "none": {"vocab_size": None},
                 "out_file": {"out_dir": tmp_path / "file"}, "kind": {"kind": "wordpiece"}}[case])
    with pytest.raises(error, match=match):
        train_tokenizer(**args)
