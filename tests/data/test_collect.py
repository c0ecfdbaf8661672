"""Collection: every format to records, datasets row by row in constant memory, deterministic
folder walks, skips reported with their reasons, clear errors for inputs that do not exist."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import pytest

from pagoda.data import collect as collect_module
from pagoda.data.collect import CollectConfig, CollectReport, collect
from pagoda.data.crawl import CrawlConfig
from pagoda.data.record import Record
from pagoda.errors import ConfigError, DocumentError


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def pdf_bytes(text: str) -> bytes:
    fpdf = pytest.importorskip("fpdf")
    pdf = fpdf.FPDF()
    pdf.set_font("helvetica", size=12)
    pdf.add_page()
    pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


def docx_bytes(text: str) -> bytes:
    docx = pytest.importorskip("docx")
    word = docx.Document()
    word.add_paragraph(text)
    buffer = io.BytesIO()
    word.save(buffer)
    return buffer.getvalue()


def run(inputs: list, **config) -> tuple[list[Record], CollectReport]:
    report = CollectReport()
    return list(collect(inputs, CollectConfig(**config), report)), report


def test_every_format(tmp_path):
    write(tmp_path / "a.txt", "Plain text.\n")
    write(tmp_path / "b.md", "# Title\n\nSome *markdown*.\n")
    write(tmp_path / "c.html", "<html><head><title>T</title></head><body><h1>Head</h1>"
                               "<p>Para <b>bold</b>.</p><script>x()</script></body></html>")
    write(tmp_path / "d.pdf", pdf_bytes("Text inside a PDF."))
    write(tmp_path / "e.docx", docx_bytes("Text inside Word."))
    first_line = '{"text": "line one", "id": 7, "tags": ["x"]}\n'
    write(tmp_path / "f.jsonl", first_line + '{"text": "line two", "id": 8}\n')
    write(tmp_path / "g.csv", "id,text\n1,row one\n2,\"row, two\"\n")
    write(tmp_path / "h.json", json.dumps([{"text": "item zero"}, {"text": "item one"}]))
    records, report = run([tmp_path])
    at = str(tmp_path)
    assert [(r.source.removeprefix(at), r.text) for r in records] == [
        ("/a.txt", "Plain text.\n"),
        ("/b.md", "# Title\n\nSome *markdown*.\n"),
        ("/c.html", "Head\n\nPara bold."),
        ("/d.pdf", "Text inside a PDF."),
        ("/e.docx", "Text inside Word."),
        ("/f.jsonl:1", "line one"),
        ("/f.jsonl:2", "line two"),
        ("/g.csv:2", "row one"),
        ("/g.csv:3", "row, two"),
        ("/h.json[0]", "item zero"),
        ("/h.json[1]", "item one"),
    ]
    assert report.skipped == []
    formats = [r.meta["format"] for r in records]
    assert formats == ["txt", "md", "html", "pdf", "docx", "jsonl", "jsonl", "csv", "csv",
                       "json", "json"]
    assert records[0].meta == {"format": "txt", "bytes": 12}
    assert records[3].meta["bytes"] == (tmp_path / "d.pdf").stat().st_size
    assert records[5].meta == {"id": 7, "format": "jsonl",
                               "bytes": len(first_line)}  # lists stay out
    assert records[7].meta == {"id": "1", "format": "csv", "bytes": len("1,row one\n")}
    assert all(r.steps == () for r in records)


def test_folders_walk_in_name_order_without_hidden_entries(tmp_path, monkeypatch):
    for name in ["b.txt", "a/z.txt", "a/b/c.txt", "B.txt", "c.txt", ".hidden.txt",
                 ".git/config.txt", "a/.cache/x.txt"]:
        write(tmp_path / "corpus" / name, f"{name}\n")
    monkeypatch.chdir(tmp_path)  # sources keep the path as given, relative here
    records, report = run(["corpus/"])
    assert [r.source for r in records] == ["corpus/B.txt", "corpus/a/b/c.txt", "corpus/a/z.txt",
                                           "corpus/b.txt", "corpus/c.txt"]
    assert report.skipped == []
    assert run(["corpus"]) == (records, report)  # the same records again


def test_jsonl_malformed_lines_are_skipped_with_file_and_line(tmp_path):
    path = write(tmp_path / "data.jsonl", "\n".join([
        '{"text": "first"}',
        '{"text": "broken',
        "",
        '{"body": "no text field"}',
        '["not", "an", "object"]',
        '{"text": 42}',
        '{"text": "   "}',
        '{"text": "last", "source": "theirs", "format": "theirs", "lang": "en"}',
    ]) + "\n")
    records, report = run([path])
    assert [(r.source, r.text) for r in records] == [(f"{path}:1", "first"),
                                                      (f"{path}:8", "last")]
    assert records[1].meta["format"] == "jsonl" and records[1].meta["lang"] == "en"
    assert report.skipped == [
        (f"{path}:2", "invalid JSON"),
        (f"{path}:4", "no string field 'text'"),
        (f"{path}:5", "no string field 'text'"),
        (f"{path}:6", "no string field 'text'"),
        (f"{path}:7", "empty text"),
    ]
    records, report = run([path], text_field="body")
    assert [r.text for r in records] == ["no text field"]


def test_jsonl_streams_in_constant_memory(tmp_path):
    line = json.dumps({"text": "word " * 200}) + "\n"
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for _ in range(10_000):  # ~10 MB
            f.write(line)
    tracemalloc.start()
    try:
        count = sum(1 for _ in collect([path], CollectConfig()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 10_000
    assert peak < 1_000_000  # a few lines' worth, not the 10 MB file


def test_csv_rows(tmp_path):
    path = write(tmp_path / "rows.csv", "\ufeffid, body ,lang\n"
                                        "1,simple,en\n"
                                        "\n"
                                        '2,"two\nlines",de\n'
                                        "3,too,many,fields\n"
                                        "4,,fr\n"
                                        "5,last,it\n")
    records, report = run([path], csv_column="body")
    assert [(r.source, r.text, r.meta["lang"]) for r in records] == [
        (f"{path}:2", "simple", "en"), (f"{path}:4", "two\nlines", "de"),
        (f"{path}:8", "last", "it")]
    assert report.skipped == [(f"{path}:6", "4 fields where the header has 3"),
                              (f"{path}:7", "empty text")]
    records, report = run([path])  # no "text" column: the file is skipped, not the run
    assert records == []
    assert report.skipped == [(str(path), "no column 'text' (columns: id, body, lang)")]
    tsv = write(tmp_path / "rows.tsv", "text\tn\na, b\t1\n")
    assert [(r.text, r.meta["n"]) for r in run([tsv])[0]] == [("a, b", "1")]


def test_json_files(tmp_path):
    listed = write(tmp_path / "list.json", json.dumps([{"text": "one"}, {"x": 1}, "three"]))
    single = write(tmp_path / "one.json", json.dumps({"text": "alone", "n": 1}))
    broken = write(tmp_path / "broken.json", '[{"text": "one"},')
    records, report = run([listed, single, broken])
    assert [(r.source, r.text) for r in records] == [(f"{listed}[0]", "one"),
                                                      (str(single), "alone")]
    assert records[1].meta == {"n": 1, "format": "json", "bytes": 25}
    assert report.skipped == [(f"{listed}[1]", "no string field 'text'"),
                              (f"{listed}[2]", "no string field 'text'"),
                              (str(broken), "invalid JSON")]


def test_unusable_files_are_skipped_with_reasons(tmp_path):
    write(tmp_path / "bad.pdf", b"%PDF-1.4 truncated")
    write(tmp_path / "empty.txt", "")
    write(tmp_path / "good.txt", "fine\n")
    write(tmp_path / "image.png", b"\x89PNG\r\n")
    write(tmp_path / "latin1.csv", b"text\ncaf\xe9\nok\n")
    write(tmp_path / "latin1.jsonl", b'{"text": "caf\xe9"}\n')
    records, report = run([tmp_path])
    assert [r.text for r in records] == ["fine\n", "ok"]
    reasons = {source.removeprefix(f"{tmp_path}/"): reason for source, reason in report.skipped}
    assert reasons.keys() == {"bad.pdf", "empty.txt", "image.png", "latin1.csv:2",
                              "latin1.jsonl:1"}
    assert reasons["bad.pdf"].startswith("cannot be read as PDF")
    assert reasons["empty.txt"] == "the file is empty"
    assert reasons["image.png"] == "unsupported file type .png"
    assert reasons["latin1.csv:2"] == reasons["latin1.jsonl:1"] == "not UTF-8 text"


def test_extensions_allow_list(tmp_path):
    write(tmp_path / "a.md", "markdown\n")
    write(tmp_path / "b.txt", "text\n")
    records, report = run([tmp_path], extensions=frozenset({".md"}))
    assert [r.text for r in records] == ["markdown\n"]
    assert report.skipped == [(str(tmp_path / "b.txt"), "unsupported file type .txt")]
    with pytest.raises(DocumentError, match="no .pdf files in the folder"):
        collect([tmp_path], CollectConfig(extensions=frozenset({".pdf"})))
    with pytest.raises(ConfigError, match=r"cannot collect \.exe"):
        CollectConfig(extensions=frozenset({".md", ".exe"}))


def test_missing_inputs_and_empty_folders_raise_before_reading(tmp_path):
    good = write(tmp_path / "good.txt", "fine\n")
    with pytest.raises(DocumentError, match="nowhere.txt: no such file or folder"):
        collect([good, tmp_path / "nowhere.txt"])  # raised by the call, nothing read yet
    (tmp_path / "empty").mkdir()
    write(tmp_path / "hidden_only" / ".secret.txt", "x\n")
    for folder in ("empty", "hidden_only"):
        with pytest.raises(DocumentError, match=f"{folder}: no .* files in the folder"):
            collect([tmp_path / folder])
    with pytest.raises(DocumentError, match="no inputs"):
        collect([])


def test_symbolic_links_are_followed_only_when_asked(tmp_path):
    write(tmp_path / "corpus" / "real.txt", "real\n")
    write(tmp_path / "elsewhere" / "linked.txt", "linked\n")
    (tmp_path / "corpus" / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "corpus" / "loop").symlink_to(tmp_path / "corpus")
    assert [r.text for r in run([tmp_path / "corpus"])[0]] == ["real\n"]
    followed = run([tmp_path / "corpus"], follow_symlinks=True)[0]
    assert [r.source.removeprefix(str(tmp_path)) for r in followed] == [
        "/corpus/link/linked.txt", "/corpus/real.txt"]  # the loop is entered no second time


def test_urls_go_to_the_crawler(tmp_path, monkeypatch):
    seen = {}

    def fake_crawl(seeds, config, report):
        seen.update(seeds=seeds, config=config)
        return iter([Record("page", seeds[0])])

    monkeypatch.setattr(collect_module, "crawl", fake_crawl)
    path = write(tmp_path / "a.txt", "file\n")
    crawl_config = CrawlConfig(max_depth=0, delay=0.0)
    records, _ = run(["https://example.org/", path, "http://example.org/b"], crawl=crawl_config)
    assert [r.source for r in records] == [str(path), "https://example.org/"]
    assert seen == {"seeds": ["https://example.org/", "http://example.org/b"],
                    "config": crawl_config}
