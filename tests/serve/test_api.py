"""The OpenAI-compatible API with the official `openai` SDK against a live server running the
real SmolLM2-135M-Instruct (answers are kept short so the file runs in well under a minute)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

pytestmark = pytest.mark.real_model

HELLO = [{"role": "user", "content": "Name three colours."}]


def test_chat_completion_fields_and_usage(smol_server):
    client = smol_server.openai()
    r = client.chat.completions.create(model=smol_server.state.model_id, messages=HELLO,
                                       max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == smol_server.state.model_id and abs(r.created - time.time()) < 60
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_matches_non_streaming_and_reports_usage(smol_server):
    client = smol_server.openai()
    kw = dict(model="gpt-4o-mini", messages=HELLO, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens


def test_raw_sse_ends_with_done(smol_server):
    body = {"model": "gpt-4o-mini", "messages": HELLO, "max_tokens": 3, "stream": True}
    with smol_server.http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant",
                                                                  "content": ""}


def test_n_choices_with_a_seed_reproduce(smol_server):
    client = smol_server.openai()
    kw = dict(model="gpt-4o-mini", messages=HELLO, max_tokens=10, temperature=1.0, seed=7, n=2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert 2 <= a.usage.completion_tokens <= 20  # counted over both choices
    other = client.chat.completions.create(**{**kw, "seed": 8, "n": 1})
    assert other.choices[0].message.content == client.chat.completions.create(
        **{**kw, "seed": 8, "n": 1}).choices[0].message.content


def test_stop_string_cuts_the_answer(smol_server):
    client = smol_server.openai()
    kw = dict(model="gpt-4o-mini", messages=HELLO, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    assert len(full) > 12, full
    stop = full[len(full) // 2: len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    r = client.chat.completions.create(**kw, stop=[stop])
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **kw, stop=stop, stream=True))
    assert streamed == expected


def test_the_deepseek_request_works_verbatim(smol_server):
    body = {"model": "deepseek-chat", "messages": [
        {"role": "system", "content": "你是一个相声捧哏,请你不要让话掉在地上。"},
        {"role": "user", "content": "被门夹过的核桃,还能补脑吗?"}], "temperature": 1,
        "stream": False}
    r = smol_server.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["model"] == "deepseek-chat" and data["object"] == "chat.completion"
    assert isinstance(data["choices"][0]["message"]["content"], str)
    assert set(data["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_chat_logprobs(smol_server):
    r = smol_server.openai().chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)  # greedy
        assert bytes(entry.bytes).decode("utf-8", "replace")


def test_models_health_ready(smol_server):
    models = smol_server.openai().models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == smol_server.state.model_id
    assert {"deepseek-chat", "gpt-3.5-turbo", "gpt-4o-mini"} <= set(ids)
    assert smol_server.http.get("/health").json() == {"status": "ok"}
    ready = smol_server.http.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert smol_server.http.get("/v1/models/deepseek-chat").json()["id"] == "deepseek-chat"


def test_metrics_count_requests_tokens_and_kv_cache(smol_server):
    smol_server.openai().chat.completions.create(model="gpt-4o-mini", messages=HELLO,
                                                 max_tokens=3)
    m = smol_server.metric
    assert m("pagoda_requests_total",
             '{endpoint="/v1/chat/completions",status="200"}') >= 1
    assert m("pagoda_time_to_first_token_seconds_count") >= 1
    assert m("pagoda_inter_token_latency_seconds_count") >= 1
    assert m("pagoda_prompt_tokens_total") > 0 and m("pagoda_generation_tokens_total") >= 3
    assert m("pagoda_kv_cache_blocks_total") == 8192 / 16
    assert m("pagoda_kv_cache_blocks_used") == 0 and m("pagoda_requests_running") == 0
    text = smol_server.http.get("/metrics").text
    for name in ("pagoda_request_latency_seconds_bucket", "pagoda_requests_waiting",
                 "pagoda_kv_cache_usage_ratio"):
        assert name in text


def test_completions_echo_logprobs_score_the_prompt(smol_server, smol):
    """lm-evaluation-harness local-completions: token-id prompts, echo, logprobs=1, max_tokens
    0 or 1; the prompt's logprobs come from a plain forward (the scoring path)."""
    from pagoda.infer.scoring import prompt_logprobs

    tok = smol.tokenizer
    prompts = [tok.encode("The capital of France is Paris"), tok.encode("One, two, three")]
    client = smol_server.openai()
    r = client.completions.create(model="gpt-3.5-turbo", prompt=prompts, echo=True,
                                  logprobs=1, max_tokens=1, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    for ids, choice in zip(prompts, r.choices, strict=True):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None and len(lp.tokens) == len(lp.text_offset)
        expected, _ = prompt_logprobs(smol.model, ids)
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected[1:], abs=2e-3)
        # the generated (greedy) token is the top-1 alternative, as lm-eval's is_greedy reads it
        assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()),
                                                      abs=1e-4)
        assert choice.text.startswith(tok.decode(ids))
    only = client.completions.create(model="gpt-3.5-turbo", prompt=prompts[0], echo=True,
                                     logprobs=0, max_tokens=0)
    assert len(only.choices[0].logprobs.token_logprobs) == len(prompts[0])
    assert only.usage.completion_tokens == 0


def test_completions_text_prompt_and_stream(smol_server):
    client = smol_server.openai()
    r = client.completions.create(model="gpt-4o-mini", prompt="Once upon a time",
                                  max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="gpt-4o-mini", prompt="Once upon a time", max_tokens=6, temperature=0,
        stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(smol_server):
    before = smol_server.metric("pagoda_generation_tokens_total")
    body = {"model": "gpt-4o-mini", "messages": HELLO, "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=smol_server.base_url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            seen = 0
            for line in r.iter_lines():
                seen += bool(line.startswith("data: "))
                if seen >= 4:
                    break
    smol_server.wait_idle(timeout=10)
    assert smol_server.metric("pagoda_kv_cache_blocks_used") == 0
    assert smol_server.metric("pagoda_requests_running") == 0
    generated = smol_server.metric("pagoda_generation_tokens_total") - before
    assert 3 <= generated < 150, generated


def test_a_non_streaming_client_that_gives_up_cancels_its_generation(smol_server):
    before = smol_server.metric("pagoda_generation_tokens_total")
    body = {"model": "gpt-4o-mini", "messages": HELLO, "max_tokens": 200, "temperature": 0,
            "ignore_eos": True}
    with httpx.Client(base_url=smol_server.base_url, timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", json=body)
    smol_server.wait_idle(timeout=10)
    generated = smol_server.metric("pagoda_generation_tokens_total") - before
    assert generated < 150, generated


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer"}}}


@pytest.mark.parametrize("seed,temperature", [(0, 0.0), (1, 0.8), (2, 1.2)])
def test_json_schema_output_always_validates(smol_server, seed, temperature):
    import jsonschema

    client = smol_server.openai()
    r = client.chat.completions.create(
        model="deepseek-chat", seed=seed, temperature=temperature, max_tokens=160,
        messages=[{"role": "user", "content": "Invent a person and give their name and age."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_output_parses_when_streamed(smol_server):
    client = smol_server.openai()
    chunks = client.chat.completions.create(
        model="deepseek-chat", temperature=0, max_tokens=128, stream=True,
        messages=[{"role": "user", "content": "Describe a cat as a JSON object."}],
        response_format={"type": "json_object"})
    text, finish = "", None
    for c in chunks:
        if c.choices:
            text += c.choices[0].delta.content or ""
            finish = c.choices[0].finish_reason or finish
    if finish == "stop":  # a length cut may truncate JSON, as with OpenAI's JSON mode
        assert isinstance(json.loads(text), dict)
