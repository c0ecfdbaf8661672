"""The data inbox: uploads and webhook deliveries queued by content name (idempotent, never
overwriting, never outside the dataset's folder), atomic writes, and read back by `collect`."""

from __future__ import annotations

import hashlib

import pytest

from pagoda.data.collect import collect
from pagoda.data.inbox import (
    DatasetNotFoundError,
    QueuedItem,
    enqueue_file,
    enqueue_files,
    enqueue_records,
    inbox_dir,
    list_inbox,
)
from pagoda.errors import DocumentError, InvalidRequestError

NOTE = b"# Leave\n\nEmployees get sixteen weeks of paid parental leave.\n"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_inbox_dir_is_under_pagoda_home(home):
    assert inbox_dir("hr_docs-2.v1") == home / "data" / "inbox" / "hr_docs-2.v1"


@pytest.mark.parametrize("name", ["", ".hidden", "..", "a/b", "../x", "a b", "x" * 65, "数据",
                                  "ok\n"])
def test_bad_dataset_names_are_refused(name):
    with pytest.raises(InvalidRequestError, match="bad dataset name"):
        inbox_dir(name)


def test_upload_is_stored_under_its_content_hash_and_reupload_is_idempotent(home):
    item = enqueue_file("hr", "leave.md", NOTE)
    assert item == QueuedItem(f"{hashlib.sha256(NOTE).hexdigest()[:12]}-leave.md", len(NOTE),
                              "upload")
    assert (inbox_dir("hr") / item.name).read_bytes() == NOTE
    assert enqueue_file("hr", "leave.md", NOTE) == item
    assert [p.name for p in inbox_dir("hr").iterdir()] == [item.name]  # no second copy, no temp


def test_same_name_different_content_keeps_both():
    first = enqueue_file("hr", "notes.txt", b"first version")
    second = enqueue_file("hr", "notes.txt", b"second version")
    assert first.name != second.name
    assert {i.name for i in list_inbox("hr")} == {first.name, second.name}


@pytest.mark.parametrize("filename", ["../../escape.txt", "/etc/passwd.txt", "..\\..\\win.txt",
                                      "C:\\Users\\x\\evil.txt", "sub/dir/../../up.txt"])
def test_path_traversal_keeps_only_the_basename(home, filename):
    item = enqueue_file("hr", filename, b"some text")
    assert "/" not in item.name and "\\" not in item.name and ".." not in item.name
    assert (inbox_dir("hr") / item.name).is_file()
    assert [p for p in home.rglob("*") if p.is_file()] == [inbox_dir("hr") / item.name]


def test_odd_characters_are_replaced_and_suffixes_lowered():
    name = enqueue_file("hr", "Q3 report (final)\x00.PDF", b"%PDF-1.4 not really").name
    assert name.endswith("-Q3_report_final_.pdf")
    assert enqueue_file("hr", "规章制度.md", NOTE).name.endswith("-规章制度.md")


@pytest.mark.parametrize("filename", ["tool.exe", "README", "..", "archive.tar.gz", ""])
def test_unsupported_types_are_refused(filename):
    with pytest.raises(DocumentError, match="unsupported file type"):
        enqueue_file("hr", filename, b"data")


def test_empty_file_is_refused():
    with pytest.raises(DocumentError, match="empty"):
        enqueue_file("hr", "empty.txt", b"")


def test_one_bad_file_queues_none_of_the_batch():
    with pytest.raises(DocumentError, match="tool.exe"):
        enqueue_files("hr", [("ok.txt", b"fine"), ("tool.exe", b"MZ")])
    assert not inbox_dir("hr").exists()


def test_webhook_records_become_one_jsonl_file_idempotently():
    records = [{"text": "First message.", "author": "ana", "score": 3},
               {"text": "Second message.", "lang": None}]
    item = enqueue_records("support", records)
    assert item.kind == "webhook" and item.records == 2
    assert item.name.startswith("webhook-") and item.name.endswith(".jsonl")
    assert len(item.name) == len("webhook-") + 16 + len(".jsonl")
    reordered = [{"score": 3, "author": "ana", "text": "First message."}, records[1]]
    assert enqueue_records("support", reordered).name == item.name  # same payload, same file
    assert enqueue_records("support", records[:1]).name != item.name
    assert [(i.name, i.records) for i in list_inbox("support") if i.name == item.name] == [
        (item.name, 2)]


@pytest.mark.parametrize("records, message", [
    ([], "at least one record"),
    ([{"text": "ok"}, {"body": "no text"}], "record 1 needs a non-empty string field 'text'"),
    ([{"text": "ok"}, {"text": "ok"}, {"text": "   "}], "record 2 needs"),
    ([{"text": 5}], "record 0 needs"),
    ([{"text": "ok"}, "just a string"], "record 1 is not a JSON object"),
    ([{"text": "ok", "tags": ["a", "b"]}], "record 0: field 'tags'"),
])
def test_bad_records_name_their_index(records, message):
    with pytest.raises(InvalidRequestError, match=message):
        enqueue_records("support", records)
    assert not inbox_dir("support").exists()


def test_list_inbox_of_an_unknown_dataset_is_not_found():
    with pytest.raises(DatasetNotFoundError, match="no dataset named 'nothing'"):
        list_inbox("nothing")


def test_listing_is_in_name_order_and_skips_temporary_files():
    upload = enqueue_file("mixed", "a.txt", b"plain text")
    hook = enqueue_records("mixed", [{"text": "from a webhook"}])
    (inbox_dir("mixed") / ".tmpabc.tmp").write_bytes(b"half written")
    assert list_inbox("mixed") == sorted([upload, hook], key=lambda i: i.name)


def test_collect_reads_queued_uploads_and_webhook_records():
    enqueue_file("corpus", "leave.md", NOTE)
    enqueue_file("corpus", "rows.csv", b"text,topic\nA row about holidays.,hr\n")
    enqueue_records("corpus", [{"text": "Hooked record one.", "channel": "chat"},
                               {"text": "Hooked record two."}])
    (inbox_dir("corpus") / ".partial.tmp").write_bytes(b"{broken")  # a write in progress
    records = list(collect([inbox_dir("corpus")]))
    assert len(records) == 4
    hooked = [r for r in records if r.meta.get("format") == "jsonl"]
    assert [r.text for r in hooked] == ["Hooked record one.", "Hooked record two."]
    assert hooked[0].meta["channel"] == "chat"
    assert any("sixteen weeks" in r.text for r in records)
    assert any(r.text == "A row about holidays." and r.meta["topic"] == "hr" for r in records)
