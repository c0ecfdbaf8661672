"""`pagoda data tokenize`: shards from the command line, JSON output, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from pagoda.cli import main
from pagoda.data.shards import TokenShards
from pagoda.tokenizer.train import train_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare/input.txt"


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_tokenize_writes_shards_and_reports_them(capsys, tmp_path):
    play = tmp_path / "play.txt"
    play.write_text(SHAKESPEARE.read_text()[:100_000])
    train_tokenizer([play], None, tmp_path / "tok", kind="char", held_out_fraction=0)
    code, out, _ = cli(capsys, "data", "tokenize", play, "--tokenizer", tmp_path / "tok",
                       "--out", tmp_path / "shards", "--val-fraction", 0.1, "--workers", 1,
                       "--json")
    assert code == 0
    index = json.loads(out)
    assert index["out"] == str(tmp_path / "shards") and index["splits"]["val"]["tokens"] == 10_000
    assert len(TokenShards.open(tmp_path / "shards", "val")) == 10_000
    code, out, _ = cli(capsys, "data", "tokenize", play, "--tokenizer", tmp_path / "tok",
                       "--out", tmp_path / "again", "--workers", 1, "--val-fraction", 0)
    assert code == 0 and "100,000 tokens" in out and "uint16" in out


def test_errors_are_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    (tmp_path / "good.txt").write_text("some text\n")
    train_tokenizer([tmp_path / "good.txt"], 260, tmp_path / "tok")
    code, _, err = cli(capsys, "data", "tokenize", bad, "--tokenizer", tmp_path / "tok",
                       "--out", tmp_path / "out", "--workers", 1)
    assert code == 1 and err == f"error: {bad}:2: expected a JSON object with a string field " \
        "'text' (choose the field with --text-field)\n"
    code, _, err = cli(capsys, "data", "tokenize", bad, "--tokenizer", tmp_path / "nothing",
                       "--out", tmp_path / "out")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1

