"""`/v1/data/{dataset}/...`: uploads and webhook deliveries queued into the data inbox, listed,
and read back by `collect`; API keys, signatures, size limits and every error in OpenAI's
format. The router runs in a bare app (no model); one test checks `create_app` serves it."""

from __future__ import annotations

import hashlib
import hmac
import json

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from pagoda.data.collect import collect
from pagoda.data.inbox import inbox_dir
from pagoda.serve import ServeSettings
from pagoda.serve.app import JsonBodies
from pagoda.serve.auth import Guard
from pagoda.serve.data_routes import build_data_router
from pagoda.serve.errors import install_error_handlers

NOTE = b"# Leave\n\nEmployees get sixteen weeks of paid parental leave.\n"
SECRET = "whsec-test"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def client(**settings) -> TestClient:
    """The data routes behind the server's guard, error handlers and JSON-body shim."""
    settings = ServeSettings(max_upload_mb=1, **settings)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(build_data_router([Depends(Guard(settings))],
                                         settings.max_upload_mb * 2**20, settings.webhook_secret))
    return TestClient(JsonBodies(app), base_url="http://127.0.0.1")


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    return r.json()["error"]


def upload(http, dataset: str, *files: tuple[str, bytes], **kw) -> httpx.Response:
    return http.post(f"/v1/data/{dataset}/uploads",
                     files=[("files", (name, data, "application/octet-stream"))
                            for name, data in files], **kw)


def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Pagoda-Signature": f"sha256={digest}", "Content-Type": "application/json"}


def test_uploads_are_queued_and_reuploads_are_idempotent():
    http = client()
    first = upload(http, "hr", ("leave.md", NOTE), ("rows.csv", b"text\nA row.\n"))
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["object"] == "data.inbox.enqueue" and body["dataset"] == "hr"
    assert [q["kind"] for q in body["queued"]] == ["upload", "upload"]
    assert body["queued"][0] == {"name": f"{hashlib.sha256(NOTE).hexdigest()[:12]}-leave.md",
                                 "bytes": len(NOTE), "kind": "upload"}
    again = upload(http, "hr", ("leave.md", NOTE))
    assert again.json()["queued"] == body["queued"][:1]
    assert len(list(inbox_dir("hr").iterdir())) == 2


def test_same_name_different_content_is_a_second_file():
    http = client()
    a = upload(http, "hr", ("notes.txt", b"version one")).json()["queued"][0]["name"]
    b = upload(http, "hr", ("notes.txt", b"version two")).json()["queued"][0]["name"]
    assert a != b and {p.name for p in inbox_dir("hr").iterdir()} == {a, b}


def test_traversal_in_a_filename_stays_in_the_inbox(home):
    r = upload(client(), "hr", ("../../../escape.txt", b"text"), ("/etc/cron.d/x.txt", b"more"))
    assert r.status_code == 200, r.text
    assert sorted(p.parent for p in home.rglob("*") if p.is_file()) == [inbox_dir("hr")] * 2


@pytest.mark.parametrize("files, message", [
    ([("leave.md", NOTE), ("tool.exe", b"MZ\x90")], "unsupported file type .exe"),
    ([("empty.txt", b"")], "empty.txt: the file is empty"),
])
def test_unusable_files_are_400_and_queue_nothing(files, message):
    err = error(upload(client(), "hr", *files), 400)
    assert message in err["message"] and err["code"] == "invalid_document"
    assert not inbox_dir("hr").exists()


def test_bad_dataset_names_are_400():
    http = client()
    assert "bad dataset name" in error(upload(http, ".hidden", ("a.txt", b"x")), 400)["message"]
    assert "bad dataset name" in error(http.get("/v1/data/a%20b/inbox"), 400)["message"]


def test_too_large_is_413():
    http = client()
    big = b"x" * (2**20 + 1)
    err = error(upload(http, "hr", ("big.txt", big)), 413)
    assert err["code"] == "payload_too_large" and "limit of 1 MB" in err["message"]
    body = json.dumps({"text": "y" * 2**20}).encode()
    assert error(http.post("/v1/data/hr/webhook", content=body), 413)["code"] == (
        "payload_too_large")
    chunked = iter([body[:2**19], body[2**19:]])  # no Content-Length: counted while read
    assert error(http.post("/v1/data/hr/webhook", content=chunked), 413)["code"] == (
        "payload_too_large")
    assert not inbox_dir("hr").exists()


def test_api_keys_are_required_when_configured():
    http = client(api_keys=["sk-right"])
    delivery = {"text": "hello"}
    for r in (upload(http, "hr", ("a.txt", b"x")),
              http.post("/v1/data/hr/webhook", json=delivery),
              http.get("/v1/data/hr/inbox"),
              http.post("/v1/data/hr/webhook", json=delivery,
                        headers={"Authorization": "Bearer sk-wrong"})):
        assert error(r, 401)["code"] == "invalid_api_key"
    assert not inbox_dir("hr").exists()
    key = {"Authorization": "Bearer sk-right"}
    assert upload(http, "hr", ("a.txt", b"x"), headers=key).status_code == 200
    assert http.post("/v1/data/hr/webhook", json=delivery, headers=key).status_code == 200
    assert len(http.get("/v1/data/hr/inbox", headers=key).json()["data"]) == 2


def test_webhook_takes_one_record_or_many():
    http = client()
    one = http.post("/v1/data/support/webhook", json={"text": "Hi there.", "ticket": 7})
    assert one.status_code == 200, one.text
    item = one.json()["queued"][0]
    assert item["kind"] == "webhook" and item["records"] == 1
    assert item["name"].startswith("webhook-")
    many = http.post("/v1/data/support/webhook",
                     json={"records": [{"text": "First."}, {"text": "Second.", "lang": "en"}]})
    assert many.json()["queued"][0]["records"] == 2
    retried = http.post("/v1/data/support/webhook", json={"ticket": 7, "text": "Hi there."})
    assert retried.json()["queued"][0]["name"] == item["name"]
    assert len(list(inbox_dir("support").iterdir())) == 2


@pytest.mark.parametrize("body, message", [
    ({"records": [{"text": "ok"}, {"text": ""}]}, "record 1 needs a non-empty string"),
    ({"records": [{"text": "ok"}, {"text": "ok"}, 3]}, "record 2 is not a JSON object"),
    ({"records": []}, "at least one record"),
    ({"records": "text"}, "at least one record"),
    ({"body": "no text"}, "record 0 needs"),
    ([{"text": "a list"}], "must be a JSON object"),
])
def test_bad_webhook_bodies_are_400_naming_the_record(body, message):
    err = error(client().post("/v1/data/support/webhook", json=body), 400)
    assert message in err["message"]
    assert not inbox_dir("support").exists()


def test_malformed_webhook_json_is_400():
    err = error(client().post("/v1/data/support/webhook", content=b"{bad json"), 400)
    assert "could not parse the JSON body" in err["message"]


def test_webhook_signature_when_a_secret_is_set():
    http = client(webhook_secret=SECRET)
    body = json.dumps({"text": "signed delivery"}).encode()
    ok = http.post("/v1/data/support/webhook", content=body, headers=signed(body))
    assert ok.status_code == 200, ok.text
    missing = error(http.post("/v1/data/support/webhook", content=body), 401)
    assert missing["code"] == "invalid_signature" and "must be signed" in missing["message"]
    for headers in (signed(body, "another-secret"), signed(body + b" "),
                    {"X-Pagoda-Signature": "sha256=" + "0" * 64},
                    {"X-Pagoda-Signature": b"sha256=\xff"}):
        assert error(http.post("/v1/data/support/webhook", content=body, headers=headers),
                     401)["code"] == "invalid_signature"
    # the signature is checked before the body is read as JSON
    assert error(http.post("/v1/data/support/webhook", content=b"{bad"), 401)["code"] == (
        "invalid_signature")


def test_inbox_lists_queued_items_and_404s_unknown_datasets():
    http = client()
    upload(http, "mixed", ("a.txt", b"plain text"))
    http.post("/v1/data/mixed/webhook", json={"records": [{"text": "x"}, {"text": "y"}]})
    listed = http.get("/v1/data/mixed/inbox").json()
    assert listed["object"] == "list" and listed["dataset"] == "mixed"
    kinds = {item["kind"]: item for item in listed["data"]}
    assert kinds["webhook"]["records"] == 2 and "records" not in kinds["upload"]
    assert kinds["upload"]["bytes"] == len(b"plain text")
    assert error(http.get("/v1/data/nothing-yet/inbox"), 404)["code"] == "dataset_not_found"


def test_queued_files_are_read_back_by_collect():
    http = client()
    upload(http, "corpus", ("leave.md", NOTE))
    http.post("/v1/data/corpus/webhook",
              json={"records": [{"text": "Hooked one.", "channel": "chat"},
                                {"text": "Hooked two."}]})
    records = list(collect([inbox_dir("corpus")]))
    assert len(records) == 3
    assert any("sixteen weeks" in r.text and r.meta["format"] == "md" for r in records)
    hooked = [r for r in records if r.meta["format"] == "jsonl"]
    assert [r.text for r in hooked] == ["Hooked one.", "Hooked two."]
    assert hooked[0].meta["channel"] == "chat"


@pytest.mark.real_model
def test_the_server_serves_the_data_routes(tiny, start_server):
    live = start_server(tiny, ServeSettings(api_keys=["sk-a"], webhook_secret=SECRET,
                                            engine={"max_running": 2, "kv_cache_tokens": 1024}))
    key = {"Authorization": "Bearer sk-a"}
    assert upload(live.http, "live", ("leave.md", NOTE), headers=key).status_code == 200
    body = b'{"text": "from the live server"}'
    hooked = live.http.post("/v1/data/live/webhook", content=body, headers={**key, **signed(body)})
    assert hooked.status_code == 200, hooked.text
    listed = live.http.get("/v1/data/live/inbox", headers=key).json()["data"]
    assert [item["kind"] for item in listed] == ["upload", "webhook"]  # name order
    assert error(live.http.get("/v1/data/live/inbox"), 401)["code"] == "invalid_api_key"
