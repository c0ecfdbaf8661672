"""Every error case answers OpenAI's format with the right status (and never a bare 500), on a
tiny random model that speaks SmolLM2's vocabulary (fast)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import openai
import pytest

from pagoda.serve import ServeSettings

pytestmark = pytest.mark.real_model  # the tiny model borrows the pulled model's tokenizer

MSG = [{"role": "user", "content": "hi"}]


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def _access_entry(caplog, request_id: str, timeout: float = 5.0) -> dict:
    """The access-log entry of a request (logged just after its last byte, so poll)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in list(caplog.records):
            if rec.name == "pagoda.serve.access" and request_id in rec.getMessage():
                return json.loads(rec.getMessage())
        time.sleep(0.02)
    raise AssertionError(f"no access-log entry for {request_id}")


def _chat(server, **fields) -> httpx.Response:
    return server.http.post("/v1/chat/completions",
                            json={"model": "tiny-random", "messages": MSG, "max_tokens": 2,
                                  **fields})


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"\xff\xfe{", b'{"model": "tiny-random",'])
def test_malformed_json_is_400(tiny_server, raw):
    for path in ("/v1/chat/completions", "/v1/completions"):
        err = _error(tiny_server.http.post(path, content=raw), 400)
        assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json"


def test_a_body_that_is_not_an_object_is_400(tiny_server):
    err = _error(tiny_server.http.post("/v1/chat/completions", content=b"[1, 2]"), 400)
    assert "JSON object" in err["message"]


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": [str(i) for i in range(17)]}, "stop"),
    ({"seed": 2**70}, "seed"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages"),
    ({"messages": [{"role": "assistant"}]}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"model": None}, "model"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
])
def test_invalid_fields_are_400_naming_the_field(tiny_server, fields, param):
    err = _error(_chat(tiny_server, **fields), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err


def test_missing_required_field_is_400(tiny_server):
    err = _error(tiny_server.http.post("/v1/chat/completions",
                                       json={"model": "tiny-random"}), 400)
    assert err["param"] == "messages" and "Missing" in err["message"]
    err = _error(tiny_server.http.post("/v1/completions", json={"model": "tiny-random"}), 400)
    assert err["param"] == "prompt"


def test_response_format_text_is_plain_generation(tiny_server):
    assert _chat(tiny_server, response_format={"type": "text"}).status_code == 200


def test_invalid_fields_through_the_sdk(tiny_server):
    client = tiny_server.openai()
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny-random", messages=MSG, temperature=-1)
    assert exc.value.status_code == 400 and exc.value.body["param"] == "temperature"


def test_unknown_model_is_404(tiny_server):
    with pytest.raises(openai.NotFoundError) as exc:
        tiny_server.openai().chat.completions.create(model="gpt-17", messages=MSG)
    assert exc.value.body["code"] == "model_not_found" and "gpt-17" in exc.value.body["message"]
    err = _error(tiny_server.http.post("/v1/completions",
                                       json={"model": "nope", "prompt": "x"}), 404)
    assert err["param"] == "model"
    _error(tiny_server.http.get("/v1/models/nope"), 404)


def test_unknown_route_and_method_answer_openai_errors(tiny_server):
    assert _error(tiny_server.http.get("/v1/nothing"), 404)["code"] == "unknown_url"
    assert _error(tiny_server.http.get("/v1/chat/completions"), 405)


def test_context_length_exceeded_says_the_numbers(tiny_server):
    context = tiny_server.state.context  # 256
    long = [{"role": "user", "content": "word " * 400}]
    err = _error(_chat(tiny_server, messages=long), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert f"maximum context length is {context} tokens" in err["message"]
    err = _error(_chat(tiny_server, max_tokens=250), 400)
    assert err["code"] == "context_length_exceeded"
    assert "250 in the completion" in err["message"] and str(context) in err["message"]
    err = _error(tiny_server.http.post("/v1/completions", json={
        "model": "tiny-random", "prompt": list(range(300)), "max_tokens": 1}), 400)
    assert err["code"] == "context_length_exceeded" and "300" in err["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        tiny_server.openai().chat.completions.create(model="tiny-random", messages=long)
    assert exc.value.code == "context_length_exceeded"


def test_completions_reject_bad_prompts(tiny_server):
    post = tiny_server.http.post
    for prompt in [], [10**9], [[1], [-1]], "", {"a": 1}:
        err = _error(post("/v1/completions", json={"model": "tiny-random", "prompt": prompt}),
                     400)
        assert err["param"] == "prompt", err
    err = _error(post("/v1/completions", json={"model": "tiny-random", "prompt": "x",
                                               "suffix": "y"}), 400)
    assert err["param"] == "suffix"
    err = _error(post("/v1/completions", json={"model": "tiny-random", "prompt": "x",
                                               "max_tokens": 0, "stream": True}), 400)
    assert err["param"] == "max_tokens"


def test_no_bad_input_yields_a_500(tiny_server):
    bodies = [
        {"model": "tiny-random", "messages": [{"role": "tool", "content": "x"}], "max_tokens": 2},
        {"model": "tiny-random", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_tokens": 2},
        {"model": "tiny-random", "messages": [{"role": "user", "content": None}]},
        {"model": "tiny-random", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
        {"model": "tiny-random", "messages": [{}]},
        {"model": "tiny-random", "messages": [None]},
        {"model": ["x"], "messages": MSG},
        {"model": "tiny-random", "messages": MSG, "n": 10**9},
        {"model": "tiny-random", "messages": MSG, "max_tokens": 1e400},
        {"model": "tiny-random", "messages": MSG, "temperature": float("nan")},
        {"model": "tiny-random", "messages": MSG, "stop": 5},
        {"model": "tiny-random", "messages": MSG, "stream": "yes please"},
        {"model": "tiny-random", "messages": MSG, "tools": "all of them"},
        {"model": "tiny-random", "messages": MSG, "max_tokens": 2, "top_k": 5, "min_p": 0.1,
         "repetition_penalty": 1.2, "seed": -3, "user": "u", "metadata": {"a": 1}},
        {"model": "tiny-random", "prompt": [[]]},
        {"model": "tiny-random", "prompt": "x", "logprobs": 99},
        {"model": "tiny-random", "prompt": "x", "best_of": 3},
        {"model": "tiny-random", "prompt": ["a", 1]},
    ]
    for body in bodies:
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        raw = json.dumps(body, allow_nan=True)
        r = tiny_server.http.post(path, content=raw)
        assert r.status_code in (200, 400), (body, r.status_code, r.text)
        if r.status_code == 400:
            _error(r, 400)
    tiny_server.wait_idle()


def test_queue_full_is_503(tiny, start_server):
    live = start_server(tiny, ServeSettings(engine={"max_running": 1, "max_waiting": 1,
                                                    "kv_cache_tokens": 1024}))
    body = {"model": "tiny-random", "messages": MSG, "max_tokens": 200, "ignore_eos": True}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body)
                                          for _ in range(8)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses, statuses
    assert set(statuses) == {200, 503}
    err = _error(next(r for r in responses if r.status_code == 503), 503)
    assert err["code"] == "queue_full" and err["type"] == "server_error"
    live.wait_idle()


def test_streaming_errors_before_the_first_byte_keep_their_status(tiny_server):
    with tiny_server.http.stream("POST", "/v1/chat/completions", json={
            "model": "tiny-random", "messages": MSG, "stream": True, "max_tokens": 999}) as r:
        assert r.status_code == 400
        assert json.loads(r.read())["error"]["code"] == "context_length_exceeded"


def test_access_log_is_json_without_prompts(tiny_server, caplog):
    with caplog.at_level(logging.INFO, logger="pagoda.serve.access"):
        r = _chat(tiny_server, messages=[{"role": "user", "content": "secret sauce"}])
        assert r.status_code == 200
        entry = _access_entry(caplog, r.headers["x-request-id"])
    assert entry["status"] == 200 and entry["path"] == "/v1/chat/completions"
    assert entry["prompt_tokens"] > 0 and entry["completion_tokens"] == 2
    assert entry["latency_s"] > 0 and "prompt" not in entry
    assert "secret sauce" not in json.dumps(entry)


def test_access_log_includes_prompts_when_asked(tiny, start_server, caplog):
    live = start_server(tiny, ServeSettings(log_prompts=True,
                                            engine={"max_running": 2, "kv_cache_tokens": 1024}))
    with caplog.at_level(logging.INFO, logger="pagoda.serve.access"):
        r = live.http.post("/v1/chat/completions", headers={"x-request-id": "req-42"}, json={
            "model": "tiny-random", "messages": [{"role": "user", "content": "secret sauce"}],
            "max_tokens": 1})
        assert r.headers["x-request-id"] == "req-42"
        entry = _access_entry(caplog, "req-42")
    assert "secret sauce" in entry["prompt"]


def test_keeps_serving_after_mixed_requests_and_disconnects(tiny, start_server):
    """1,000 valid, invalid and abandoned requests (100 mid-stream disconnects) concurrently;
    afterwards the server still answers and no KV block is leaked."""
    live = start_server(tiny, ServeSettings(engine={"max_running": 4, "max_waiting": 64,
                                                    "kv_cache_tokens": 4096}))
    good = {"model": "tiny-random", "messages": MSG, "max_tokens": 4}
    bodies = [good, {**good, "stream": True}, {**good, "temperature": -1},
              {**good, "model": "nope"}, {**good, "max_tokens": 9999},
              {"model": "tiny-random", "prompt": [1, 2, 3], "echo": True, "logprobs": 1,
               "max_tokens": 1}]

    async def one(client: httpx.AsyncClient, i: int) -> int:
        body = bodies[i % len(bodies)]
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        if i % 10 == 9:  # walk away mid-stream
            long = {**good, "max_tokens": 200, "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/chat/completions", json=long) as r:
                async for _ in r.aiter_lines():
                    break
            return 200
        return (await client.post(path, json=body)).status_code

    async def run() -> list[int]:
        gate = asyncio.Semaphore(64)  # at most 64 requests in flight

        async def limited(client: httpx.AsyncClient, i: int) -> int:
            async with gate:
                return await one(client, i)

        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=live.base_url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(limited(client, i) for i in range(1000)))

    statuses = asyncio.run(run())
    assert set(statuses) <= {200, 400, 404}, sorted(set(statuses))
    live.wait_idle(timeout=20)
    assert live.metric("pagoda_kv_cache_blocks_used") == 0
    assert live.metric("pagoda_requests_total", '{endpoint="/v1/chat/completions",status="500"}') \
        == 0
    r = live.openai().chat.completions.create(model="tiny-random", messages=MSG, max_tokens=2)
    assert r.choices[0].finish_reason == "length"


def test_responses_match_the_openai_schemas(tiny_server):
    """Every body and chunk validates against schemas.py (extra fields forbidden)."""
    from pagoda.serve import schemas

    post = tiny_server.http.post
    chat = {"model": "tiny-random", "messages": MSG, "max_tokens": 3, "n": 2, "logprobs": True,
            "top_logprobs": 2}
    schemas.ChatCompletion.model_validate(post("/v1/chat/completions", json=chat).json())
    with tiny_server.http.stream("POST", "/v1/chat/completions", json={
            **chat, "stream": True, "stream_options": {"include_usage": True}}) as r:
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    for line in lines[:-1]:
        schemas.ChatCompletionChunk.model_validate_json(line)
    cmpl = {"model": "tiny-random", "prompt": ["a b", "c"], "max_tokens": 2, "logprobs": 2,
            "echo": True}
    schemas.Completion.model_validate(post("/v1/completions", json=cmpl).json())
    with tiny_server.http.stream("POST", "/v1/completions", json={**cmpl, "stream": True}) as r:
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    for line in lines[:-1]:
        schemas.Completion.model_validate_json(line)
    schemas.ModelList.model_validate(tiny_server.http.get("/v1/models").json())
    schemas.ErrorResponse.model_validate(post("/v1/completions", json={}).json())
    assert "/v1/chat/completions" in tiny_server.http.get("/openapi.json").json()["paths"]
