"""`/v1/knowledge_bases/...`: create, upload (multipart), show, query, remove, delete; keys own
their knowledge bases; bad uploads are reported and never half-stored."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.real_model

LEAVE = b"# Parental leave\n\nEmployees get 16 weeks of paid parental leave.\n"
OFFICE = b"# Office\n\nThe office closes between Christmas and New Year.\n"


@pytest.fixture(params=["milvus", "sqlite"])
def server(request, start_server, tiny, tmp_path):
    from pagoda.serve import ServeSettings

    store = ({"milvus_uri": str(tmp_path / "kb.db")} if request.param == "milvus"
             else {"vector_store": f"sqlite:{tmp_path / 'kb.sqlite'}"})
    settings = ServeSettings(api_keys=["sk-a", "sk-b"], kb_dir=str(tmp_path / "kb"),
                             max_upload_mb=1, **store)
    return start_server(tiny, settings)


def test_vector_store_is_the_newer_name_of_milvus_uri_and_wins():
    from pagoda.serve import ServeSettings

    assert ServeSettings().vector_store_uri is None
    assert ServeSettings(milvus_uri="http://milvus:19530").vector_store_uri == (
        "http://milvus:19530")
    assert ServeSettings(milvus_uri="old.db", vector_store="sqlite:kb.sqlite").vector_store_uri == (
        "sqlite:kb.sqlite")


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_knowledge_base_lifecycle(server):
    http, a = server.http, auth("sk-a")
    created = http.post("/v1/knowledge_bases", json={"name": "hr-policies"}, headers=a)
    assert created.status_code == 200 and created.json()["embedder"] == "minilm-l6"
    up = http.post("/v1/knowledge_bases/hr-policies/documents", headers=a, files=[
        ("files", ("leave.md", LEAVE, "text/markdown")),
        ("files", ("office.md", OFFICE, "text/markdown")),
        ("files", ("tool.exe", b"MZ\x90\x00binary", "application/octet-stream"))]).json()
    assert [d["status"] for d in up["data"]] == ["added", "added"]
    assert up["errors"][0]["source"] == "tool.exe"
    again = http.post("/v1/knowledge_bases/hr-policies/documents", headers=a,
                      files=[("files", ("leave.md", LEAVE, "text/markdown"))]).json()
    assert again["data"][0]["status"] == "unchanged"

    shown = http.get("/v1/knowledge_bases/hr-policies", headers=a).json()
    assert [d["source"] for d in shown["documents"]] == ["leave.md", "office.md"]
    assert [k["id"] for k in http.get("/v1/knowledge_bases", headers=a).json()["data"]] == \
        ["hr-policies"]
    hits = http.post("/v1/knowledge_bases/hr-policies/query", headers=a,
                     json={"query": "paid parental leave", "k": 1}).json()["data"]
    assert hits[0]["source"] == "leave.md" and "16 weeks" in hits[0]["text"]
    reranked = http.post("/v1/knowledge_bases/hr-policies/query", headers=a, json={
        "query": "paid parental leave", "k": 2, "fusion": "rrf", "rerank": True}).json()["data"]
    assert len(reranked) == 2 and all(0.0 <= h["score"] <= 1.0 for h in reranked)  # P(yes)
    bad = http.post("/v1/knowledge_bases/hr-policies/query", headers=a,
                    json={"query": "leave", "fusion": "borda"})
    assert bad.status_code == 400 and "fusion" in bad.json()["error"]["message"]

    removed = http.delete("/v1/knowledge_bases/hr-policies/documents/office.md", headers=a)
    assert removed.json()["deleted"] is True
    assert http.get("/v1/knowledge_bases/hr-policies", headers=a).json()["documents"][0][
        "source"] == "leave.md"
    assert http.delete("/v1/knowledge_bases/hr-policies", headers=a).json()["deleted"] is True
    assert http.get("/v1/knowledge_bases/hr-policies", headers=a).status_code == 404


def test_other_keys_see_nothing(server):
    http = server.http
    http.post("/v1/knowledge_bases", json={"name": "private"}, headers=auth("sk-a"))
    b = auth("sk-b")
    assert http.get("/v1/knowledge_bases", headers=b).json()["data"] == []
    for method, path, kw in [("get", "/v1/knowledge_bases/private", {}),
                             ("post", "/v1/knowledge_bases/private/query", {"json": {"query": "x"}}),
                             ("delete", "/v1/knowledge_bases/private", {})]:
        response = getattr(http, method)(path, headers=b, **kw)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "knowledge_base_not_found"
    assert http.get("/v1/knowledge_bases").status_code == 401


def test_bad_input(server):
    http, a = server.http, auth("sk-a")
    assert http.post("/v1/knowledge_bases", json={"name": "../x"}, headers=a).status_code == 400
    http.post("/v1/knowledge_bases", json={"name": "kb1"}, headers=a)
    dup = http.post("/v1/knowledge_bases", json={"name": "kb1"}, headers=a)
    assert dup.status_code == 409
    big = http.post("/v1/knowledge_bases/kb1/documents", headers=a,
                    files=[("files", ("big.txt", b"word " * 300_000, "text/plain"))])
    assert big.status_code == 413 and "limit of 1 MB" in big.json()["error"]["message"]
    empty = http.post("/v1/knowledge_bases/kb1/documents", headers=a,
                      files=[("files", ("empty.txt", b"", "text/plain"))]).json()
    assert empty["data"] == [] and "empty" in empty["errors"][0]["error"]
    assert http.get("/v1/knowledge_bases/kb1", headers=a).json()["documents"] == []
    query = http.post("/v1/knowledge_bases/kb1/query", headers=a, json={"query": " "})
    assert query.status_code == 400
    missing = http.post("/v1/knowledge_bases/nope/query", headers=a, json={"query": "x"})
    assert missing.status_code == 404


def test_chat_grounded_on_a_knowledge_base(start_server, smol, tmp_path):
    """The issue's end-to-end check, with the real SmolLM2 behind the API: two documents in, a
    question only the second answers gets an answer citing it; an absent one gets "not in the
    knowledge base"; streaming carries the citations on its first chunk."""
    from pagoda.serve import ServeSettings

    live = start_server(smol, ServeSettings(milvus_uri=str(tmp_path / "kb.db"),
                                            kb_dir=str(tmp_path / "kb"), default_max_tokens=40))
    http = live.http
    http.post("/v1/knowledge_bases", json={"name": "handbook"})
    http.post("/v1/knowledge_bases/handbook/documents", files=[
        ("files", ("office.md", OFFICE, "text/markdown")),
        ("files", ("leave.md", LEAVE, "text/markdown"))])
    client = live.openai()
    ask = [{"role": "user", "content": "How many weeks of paid parental leave do employees get?"}]
    reply = client.chat.completions.create(model="deepseek-chat", messages=ask,
                                           extra_body={"knowledge_base": "handbook"})
    body = reply.model_dump()
    assert reply.choices[0].message.content
    assert body["citations"][0]["source"] == "leave.md"
    assert "16 weeks" in body["citations"][0]["text"]

    reranked = client.chat.completions.create(
        model="deepseek-chat", messages=ask, max_tokens=5,
        extra_body={"knowledge_base": "handbook", "rerank": True}).model_dump()
    assert reranked["citations"][0]["source"] == "leave.md"

    absent = [{"role": "user", "content": "What is the boiling point of tungsten in kelvin?"}]
    reply = client.chat.completions.create(model="deepseek-chat", messages=absent,
                                           extra_body={"knowledge_base": "handbook"})
    assert "does not contain" in reply.choices[0].message.content
    assert reply.model_dump()["citations"] == [] and reply.usage.completion_tokens == 0

    stream = client.chat.completions.create(model="deepseek-chat", messages=ask, stream=True,
                                            extra_body={"knowledge_base": "handbook"})
    chunks = [c.model_dump() for c in stream]
    assert chunks[0]["citations"][0]["source"] == "leave.md"
    assert "citations" not in chunks[1]
    stream = client.chat.completions.create(model="deepseek-chat", messages=absent, stream=True,
                                            extra_body={"knowledge_base": "handbook"})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "does not contain" in text

    missing = http.post("/v1/chat/completions", json={
        "model": "deepseek-chat", "messages": ask, "knowledge_base": "nope"})
    assert missing.status_code == 404
