"""`pagoda data tokenize` and `pagoda data prepare`: output on the command line, JSON output,
one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

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



# ------------------------------------------------------------------------ data prepare
def prose_corpus(root: Path, documents: int = 8) -> Path:
    """`documents` prose documents of ~3 KB (Shakespeare without the speakers' names, whose
    repeats the quality rules drop) in docs.jsonl, the last one with an email address."""
    lines = [line for line in SHAKESPEARE.read_text().split("\n")
             if line.strip() and not re.fullmatch(r"[A-Z][A-Za-z' ]*:", line)]
    docs = ["\n".join(lines[i:i + 80]) for i in range(0, 80 * documents, 80)]
    docs[-1] += "\nWrite to the steward at john.doe@example.com for the tickets."
    root.mkdir(parents=True, exist_ok=True)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root


def test_prepare_prints_the_speed_and_the_manifest_table(capsys, tmp_path):
    corpus, out = prose_corpus(tmp_path / "corpus"), tmp_path / "out"
    code, stdout, _ = cli(capsys, "data", "prepare", corpus, "--out", out, "--workers", 1)
    assert code == 0
    head, _, table = stdout.partition("\n\n")
    assert re.fullmatch(rf"{re.escape(str(out))}: 8 records from 8 \(0\.0 MB in \d+\.\d s, "
                        r"\d+\.\d MB/s\)", head), head
    assert table == (out / "manifest.md").read_text()
    assert "| pii | 8 | 8 | – |" in table and "PII masked: email 1;" in table


def test_prepare_json_prints_one_object(capsys, tmp_path):
    corpus, out = prose_corpus(tmp_path / "corpus"), tmp_path / "out"
    code, stdout, stderr = cli(capsys, "data", "prepare", corpus, "--out", out, "--workers", 1,
                               "--json")
    assert code == 0 and stdout.count("\n") == 1 and stderr == ""  # no progress bar either
    manifest = json.loads(stdout)
    assert manifest["out"] == str(out) and manifest["output"]["records"] == 8
    assert manifest["elapsed_s"] >= 0 and manifest["pii_masked"] == {"email": 1}
    assert {k: v for k, v in manifest.items() if k not in ("out", "elapsed_s")} \
        == json.loads((out / "manifest.json").read_text())


def test_prepare_reads_config_set_and_tokenizer(capsys, tmp_path):
    corpus, out = prose_corpus(tmp_path / "corpus"), tmp_path / "out"
    (tmp_path / "chars.txt").write_text(SHAKESPEARE.read_text() + "<>")  # the placeholder's
    train_tokenizer([tmp_path / "chars.txt"], None, tmp_path / "tok", kind="char",
                    held_out_fraction=0)
    (tmp_path / "pipeline.yaml").write_text("pii:\n  placeholder: '<{type}>'\n"
                                            "stages:\n  dedup: false\n")
    code, stdout, stderr = cli(capsys, "data", "prepare", corpus, "--out", out, "--config",
                               tmp_path / "pipeline.yaml", "--set", "stages.boilerplate=false",
                               "--tokenizer", tmp_path / "tok", "--workers", 1, "--json")
    assert code == 0, stderr
    manifest = json.loads(stdout)
    assert [row["stage"] for row in manifest["stages"]] == [
        "collect", "clean", "quality", "pii", "balance"]
    assert manifest["config"]["output"]["tokenizer"] == str(tmp_path / "tok")
    assert manifest["shards"]["splits"]["train"]["documents"] > 0
    assert (out / "shards" / "index.json").is_file()
    assert "the steward at <email> for" in (out / "data.jsonl").read_text()


def test_prepare_errors_are_one_line(capsys, tmp_path):
    corpus, out = prose_corpus(tmp_path / "corpus"), tmp_path / "out"
    missing = tmp_path / "missing"
    for argv, message in [
        ((missing,), f"error: {missing}: no such file or folder"),
        ((corpus, "--set", "dedup.threshold=abc"), "error: dedup.threshold must be float, got "
                                                   "'abc'"),
        ((corpus, "--set", "dedup"), "error: override 'dedup' must look like section.key=value"),
        ((corpus, "--set", "qualty.min_words=3"), "error: unknown config section(s) qualty"),
        ((corpus, "--workers", -2), "error: output: workers must be >= 0"),
        ((corpus, "--config", tmp_path / "none.yaml"), "error: config file not found"),
    ]:
        code, stdout, stderr = cli(capsys, "data", "prepare", *argv, "--out", out)
        assert code == 1 and stdout == "", argv
        assert stderr.startswith(message) and stderr.count("\n") == 1, stderr
        assert "Traceback" not in stderr
    code, _, stderr = cli(capsys, "data", "prepare", corpus, "--out", corpus)
    assert code == 1 and "overlaps the input" in stderr and stderr.count("\n") == 1
    assert not out.exists() and sorted(p.name for p in corpus.iterdir()) == ["docs.jsonl"]


def test_prepare_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "prepare", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "example:\n  pagoda data prepare " in text and "--out" in text and "--set" in text
