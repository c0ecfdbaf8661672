"""`pagoda tokenizer train`: JSON report, the compression table, skipped references, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagoda.cli import main
from pagoda.tokenizer import Tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare/input.txt"


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_bpe_compares_with_a_given_tokenizer(capsys, tmp_path):
    code, out, _ = cli(capsys, "tokenizer", "train", "--input", SHAKESPEARE, "--vocab-size",
                       300, "--out", tmp_path / "a", "--compare", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["vocab_size"] == 300 and set(report["bytes_per_token"]) == {"trained"}
    assert "gpt2" in report["skipped"]
    code, out, _ = cli(capsys, "tokenizer", "train", "--input", SHAKESPEARE, "--kind", "char",
                       "--out", tmp_path / "b", "--compare", tmp_path / "a", tmp_path / "nope")
    assert code == 0 and Tokenizer.from_file(tmp_path / "b").vocab_size == 65
    assert "trained" in out and "bytes/token" in out  # the table (long paths get cut)
    assert f"not compared: {tmp_path / 'nope'}" in out


def test_errors_are_one_line(capsys, tmp_path):
    code, _, err = cli(capsys, "tokenizer", "train", "--input", tmp_path / "nope.txt",
                       "--vocab-size", 300, "--out", tmp_path, "--compare")
    assert code == 1 and err.startswith("error: ") and "no such file" in err
    assert err.count("\n") == 1
    code, _, err = cli(capsys, "tokenizer", "train", "--input", SHAKESPEARE, "--out", tmp_path,
                       "--compare")
    assert code == 1 and "needs a vocab size" in err


@pytest.mark.parametrize("verb", [("tokenizer", "train"), ("data", "tokenize")])
def test_commands_help_has_an_example(capsys, verb):
    """(The verbs' own help is checked with every other verb's in test_cli.py.)"""
    with pytest.raises(SystemExit):
        main([*verb, "--help"])
    assert f"example:\n  pagoda {' '.join(verb)}" in capsys.readouterr().out
