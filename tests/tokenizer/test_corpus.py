"""Reading corpora in pieces: blocks cut at line ends, JSONL records, folders, bad files."""

from __future__ import annotations

import json

import pytest

from pagoda.tokenizer.corpus import CorpusError, corpus_files, read_pieces


def test_text_file_is_one_document_in_blocks_cut_after_newlines(tmp_path):
    text = "".join(f"línea {i} 🙂\n" for i in range(200)) + "no newline at the end"
    path = tmp_path / "a.txt"
    path.write_text(text)
    pieces = list(read_pieces(path, block_bytes=64))
    assert "".join(p.text for p in pieces) == text
    assert [p.starts_document for p in pieces] == [True] + [False] * (len(pieces) - 1)
    assert all(p.text.endswith("\n") for p in pieces[:-1])
    assert sum(p.size for p in pieces) == path.stat().st_size


def test_a_line_longer_than_a_block_never_splits_a_character(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("日本語" * 100)
    pieces = list(read_pieces(path, block_bytes=7))
    assert "".join(p.text for p in pieces) == "日本語" * 100


def test_jsonl_is_one_document_per_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": ""}) + "\n"
                    + json.dumps({"body": "two\nlines"}) + "\n")
    assert [p.text for p in read_pieces(path, "body")] == ["one", "two\nlines"]


@pytest.mark.parametrize("line, match", [
    ("{not json", r"d\.jsonl:2: not valid JSON"),
    ('{"content": "x"}', r"d\.jsonl:2: expected a JSON object with a string field 'text'"),
    ('["text"]', r"d\.jsonl:2: expected a JSON object"),
])
def test_a_malformed_record_names_file_and_line(tmp_path, line, match):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(CorpusError, match=match):
        list(read_pieces(path))


def test_folders_are_walked_and_bad_paths_refused(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.txt", "sub/a.md", "sub/c.jsonl", "sub/skip.bin"):
        (tmp_path / name).write_text('{"text": "x"}')
    assert [p.name for p in corpus_files([tmp_path])] == ["b.txt", "a.md", "c.jsonl"]
    with pytest.raises(CorpusError, match="no such file"):
        corpus_files([tmp_path / "nope"])
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(CorpusError, match="not UTF-8"):
        list(read_pieces(tmp_path / "bad.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .txt"):
        corpus_files([tmp_path / "empty"])
