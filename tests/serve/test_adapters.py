"""LoRA adapters in the server: "model": "BASE:ADAPTER" per request, requests for different
adapters in one batch, runtime load/unload through vLLM's admin endpoints, and their errors."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest

from pagoda.infer.generate import generate_tokens
from pagoda.infer.sampling import SamplingParams
from pagoda.model.lora import attach_adapter, load_adapter, set_active_adapter
from pagoda.serve import ServeSettings

from .conftest import serve, tiny_loaded

PROMPT = [1, 504, 3250, 28, 17, 30, 62]


@pytest.fixture
def setup(smol, tmp_path, random_adapter):
    """A fresh tiny model (the server attaches adapters to it) and two adapter folders."""
    loaded = tiny_loaded(smol.tokenizer)
    base = copy.deepcopy(loaded.model)
    paths = {n: random_adapter(base, tmp_path / n, s) for s, n in enumerate(("a", "b"))}
    return loaded, base, paths


def expected(base, path: str | None) -> list[int]:
    """Greedy tokens of PROMPT from a private copy of the model with that adapter active."""
    model = copy.deepcopy(base)
    if path is not None:
        attach_adapter(model, load_adapter(path), "x")
        set_active_adapter(model, "x")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    return [e[0].token_id for e in generate_tokens(model, [PROMPT], [params], frozenset())]


def complete(live, model: str):
    return live.http.post("/v1/completions", json={
        "model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
        "ignore_eos": True, "logprobs": 0})


def tokens_of(response) -> list[str]:
    return response.json()["choices"][0]["logprobs"]["tokens"]


def test_requests_pick_adapters_and_share_a_batch(setup, smol):
    loaded, base, paths = setup
    with serve(loaded, ServeSettings(adapters={"a": paths["a"], "b": paths["b"]})) as live:
        models = live.http.get("/v1/models").json()["data"]
        cards = {m["id"]: m for m in models}
        assert cards["tiny-random:a"]["parent"] == "tiny-random"
        assert cards["tiny-random:b"]["root"] == paths["b"]
        names = ["tiny-random", "tiny-random:a", "tiny-random:b", "deepseek-chat:a"] * 2
        with ThreadPoolExecutor(len(names)) as pool:  # concurrent: one continuous batch
            replies = list(pool.map(lambda m: complete(live, m), names))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        assert replies[1].json()["model"] == "tiny-random:a"
        strings = live.state.token_strings
        for name, reply in zip(names, replies, strict=True):
            adapter = name.partition(":")[2] or None
            want = [strings.text(t) for t in expected(base, paths.get(adapter))]
            assert tokens_of(reply) == want, name
        assert tokens_of(replies[0]) != tokens_of(replies[1])

        missing = live.http.post("/v1/chat/completions", json={
            "model": "tiny-random:nope", "messages": [{"role": "user", "content": "hi"}]})
        assert missing.status_code == 404
        error = missing.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert "no LoRA adapter named 'nope'" in error["message"]


def test_runtime_load_and_unload(setup):
    loaded, base, paths = setup
    with serve(loaded, ServeSettings()) as live:
        http = live.http
        assert complete(live, "tiny-random:b").status_code == 404
        ok = http.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": paths["b"]})
        assert ok.status_code == 200 and ok.json()["id"] == "tiny-random:b"
        reply = complete(live, "tiny-random:b")
        assert reply.status_code == 200
        assert tokens_of(reply) == [live.state.token_strings.text(t)
                                    for t in expected(base, paths["b"])]
        again = http.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": paths["b"]})
        assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
        bad = http.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "/nowhere"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"
        named = http.post("/v1/load_lora_adapter", json={"lora_name": "a:b", "lora_path": "x"})
        assert named.status_code == 400 and "bad adapter name" in named.json()["error"]["message"]

        gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "b"})
        assert gone.status_code == 200 and gone.json()["loaded"] is False
        assert complete(live, "tiny-random:b").status_code == 404
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "b"}).status_code == 404
        assert tokens_of(complete(live, "tiny-random")) == [
            live.state.token_strings.text(t) for t in expected(base, None)]  # base unchanged


def test_only_admin_keys_manage_adapters(setup):
    loaded, _, paths = setup
    settings = ServeSettings(api_keys=["sk-user"], admin_keys=["sk-admin"])
    with serve(loaded, settings) as live:
        body = {"lora_name": "a", "lora_path": paths["a"]}
        user = {"Authorization": "Bearer sk-user"}
        admin = {"Authorization": "Bearer sk-admin"}
        assert live.http.post("/v1/load_lora_adapter", json=body).status_code == 401
        denied = live.http.post("/v1/load_lora_adapter", json=body, headers=user)
        assert denied.status_code == 403
        assert denied.json()["error"]["type"] == "permission_error"
        assert live.http.post("/v1/load_lora_adapter", json=body, headers=admin).status_code == 200
        chat = live.http.post("/v1/completions", headers=user, json={
            "model": "tiny-random:a", "prompt": "Hi", "max_tokens": 2})
        assert chat.status_code == 200  # any key may use a loaded adapter


def test_adapter_settings_are_checked():
    from pagoda.errors import ConfigError

    with pytest.raises(ConfigError, match="bad adapter name"):
        ServeSettings.load(adapters={"a:b": "x"})
    with pytest.raises(ConfigError, match="admin_keys"):
        ServeSettings.load(admin_keys=[""])
