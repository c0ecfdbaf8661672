"""`pagoda kb ...` end to end in-process: create, add (skipping bad files), list, show, query,
ask with citations, rm-doc, delete, and one-line errors."""

from __future__ import annotations

import json
import uuid

import pytest

from pagoda.cli import main

pytestmark = pytest.mark.real_model


@pytest.fixture(params=["milvus", "sqlite"])
def kb_name(request, monkeypatch, tmp_path):
    """A fresh knowledge-base name in a vector database file of its own, Milvus Lite (through
    the older PAGODA_MILVUS_URI) or SQLite (PAGODA_VECTOR_STORE); deleted afterwards."""
    if request.param == "milvus":
        monkeypatch.setenv("PAGODA_MILVUS_URI", str(tmp_path / "milvus.db"))
    else:
        monkeypatch.setenv("PAGODA_VECTOR_STORE", f"sqlite:{tmp_path / 'kb.sqlite'}")
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    main(["kb", "delete", name])


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_kb_lifecycle(capsys, kb_name, tmp_path, smol_gguf, minilm):
    leave = tmp_path / "leave.md"
    leave.write_text("# Parental leave\n\nEmployees get 16 weeks of paid parental leave.\n")
    office = tmp_path / "office.md"
    office.write_text("# Office\n\nThe office closes between Christmas and New Year.\n")
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n")

    code, out, _ = cli(capsys, "kb", "create", kb_name, "--json")
    assert code == 0 and json.loads(out)["dim"] == 384
    code, out, _ = cli(capsys, "kb", "add", kb_name, leave, office, bad, "--json")
    added = json.loads(out)
    assert code == 1  # one file was skipped
    assert [d["status"] for d in added["documents"]] == ["added", "added"]
    assert added["errors"][0]["source"] == str(bad)
    code, out, _ = cli(capsys, "kb", "add", kb_name, leave, "--json")
    assert json.loads(out)["documents"][0]["status"] == "unchanged"

    code, out, _ = cli(capsys, "kb", "list", "--json")
    assert {"name": kb_name, "documents": 2}.items() <= next(
        r for r in json.loads(out) if r["name"] == kb_name).items()
    code, out, _ = cli(capsys, "kb", "show", kb_name, "--json")
    assert [d["source"] for d in json.loads(out)["documents"]] == [str(leave), str(office)]

    code, out, _ = cli(capsys, "kb", "query", kb_name, "paid parental leave", "--k", "1",
                       "--json")
    hits = json.loads(out)
    assert code == 0 and hits[0]["source"] == str(leave) and "16 weeks" in hits[0]["text"]
    assert set(hits[0]) >= {"source", "text", "score"}
    code, out, _ = cli(capsys, "kb", "query", kb_name, "paid parental leave", "--k", "2",
                       "--fusion", "rrf", "--rerank", "--json")
    reranked = json.loads(out)
    assert code == 0 and reranked[0]["source"] == str(leave)
    assert reranked[0]["score"] > reranked[1]["score"]  # SmolLM2's P(yes) for each passage

    code, out, _ = cli(capsys, "kb", "ask", kb_name, "How many weeks of parental leave?",
                       "--json", "--max-tokens", "24")
    answer = json.loads(out)
    assert code == 0 and answer["found"] and answer["answer"]
    assert str(leave) in [c["source"] for c in answer["citations"]]
    code, out, _ = cli(capsys, "kb", "ask", kb_name, "What is the boiling point of tungsten?",
                       "--json")
    assert json.loads(out)["found"] is False and json.loads(out)["citations"] == []

    code, out, _ = cli(capsys, "kb", "rm-doc", kb_name, office, "--json")
    assert json.loads(out) == {"removed": str(office), "chunks": 1}


def test_kb_errors_are_one_line(capsys, kb_name):
    for argv, needle in [(["kb", "query", "missing-kb", "x"], "no knowledge base named"),
                         (["kb", "create", "../up"], "bad knowledge-base name"),
                         (["kb", "show", "missing-kb"], "no knowledge base named")]:
        code, _, err = cli(capsys, *argv)
        assert code == 1 and err.startswith("error:") and needle in err
        assert len(err.strip().splitlines()) == 1
    assert cli(capsys, "kb", "create", kb_name)[0] == 0
    code, _, err = cli(capsys, "kb", "create", kb_name)
    assert code == 1 and "already exists" in err
    code, _, err = cli(capsys, "kb", "rm-doc", kb_name, "nothing.md")
    assert code == 1 and "has no document" in err
