"""API keys, the per-key rate limit, safe binding, and where settings come from."""

from __future__ import annotations

import json
import logging

import openai
import pytest

from pagoda.errors import ConfigError
from pagoda.serve import ServeSettings
from pagoda.serve.auth import TokenBucket, check_bind

MSG = [{"role": "user", "content": "hi"}]


# ------------------------------------------------------------------ live server
@pytest.mark.real_model
def test_keys_are_required_on_v1_only(tiny, start_server):
    live = start_server(tiny, ServeSettings(api_keys=["sk-right", "sk-other"],
                                            engine={"max_running": 2, "kv_cache_tokens": 1024}))
    with pytest.raises(openai.AuthenticationError) as exc:
        live.openai(api_key="sk-wrong").models.list()
    assert exc.value.status_code == 401 and exc.value.body["code"] == "invalid_api_key"
    assert "sk-wrong" not in exc.value.body["message"]  # a wrong key is never echoed whole

    r = live.http.post("/v1/chat/completions", json={"model": "tiny-random", "messages": MSG})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "didn't provide an API key" in r.json()["error"]["message"]
    assert live.http.get("/v1/models", headers={"Authorization": "Basic abc"}).status_code == 401

    for key in ("sk-right", "sk-other"):
        r = live.openai(api_key=key).chat.completions.create(model="tiny-random", messages=MSG,
                                                             max_tokens=2)
        assert r.choices[0].finish_reason == "length"
    for open_path in ("/health", "/ready", "/metrics"):
        assert live.http.get(open_path).status_code == 200


@pytest.mark.real_model
def test_rate_limit_per_key_answers_429(tiny, start_server):
    live = start_server(tiny, ServeSettings(api_keys=["sk-a", "sk-b"], rate_limit_per_minute=3,
                                            engine={"max_running": 2, "kv_cache_tokens": 1024}))
    a = live.openai(api_key="sk-a")
    for _ in range(3):
        a.models.list()
    with pytest.raises(openai.RateLimitError) as exc:
        a.models.list()
    assert exc.value.status_code == 429 and exc.value.body["code"] == "rate_limit_exceeded"
    assert int(exc.value.response.headers["retry-after"]) >= 1
    live.openai(api_key="sk-b").models.list()  # other keys have their own bucket
    assert live.http.get("/health").status_code == 200  # never rate limited


@pytest.mark.real_model
def test_rate_limit_without_keys_is_per_client(tiny, start_server):
    live = start_server(tiny, ServeSettings(rate_limit_per_minute=1,
                                            engine={"max_running": 2, "kv_cache_tokens": 1024}))
    assert live.http.get("/v1/models").status_code == 200
    assert live.http.get("/v1/models").status_code == 429


def test_token_bucket_refills_at_the_rate():
    now = [0.0]
    bucket = TokenBucket(per_minute=60, clock=lambda: now[0])  # one per second, burst 60
    assert all(bucket.take("k") == 0 for _ in range(60))
    assert bucket.take("k") == pytest.approx(1.0)
    now[0] += 0.5
    assert bucket.take("k") == pytest.approx(0.5)
    now[0] += 0.5
    assert bucket.take("k") == 0
    assert bucket.take("other") == 0


# ---------------------------------------------------------------------- binding
def test_no_keys_binds_loopback_only_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="pagoda.serve"):
        check_bind(ServeSettings(host="127.0.0.1"))
    assert any("no API key" in r.getMessage() and "127.0.0.1" in r.getMessage()
               for r in caplog.records)
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        with pytest.raises(ConfigError, match="--api-key"):
            check_bind(ServeSettings(host=host))
    check_bind(ServeSettings(host="0.0.0.0", api_keys=["sk-x"]))


def test_cli_refuses_an_open_address_without_keys(monkeypatch, capsys):
    from pagoda.cli import main

    monkeypatch.delenv("PAGODA_API_KEYS", raising=False)
    logger = logging.getLogger("pagoda.serve")  # the verb installs a handler on capsys' stderr
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logger, "level", logger.level)
    assert main(["serve", "--host", "0.0.0.0", "--model", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to serve on 0.0.0.0 without an API key")


def test_serve_help_has_an_example(capsys):
    from pagoda.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "example:" in out and "--api-key" in out and "--config" in out


# --------------------------------------------------------------------- settings
def test_settings_layers_file_env_and_flags(tmp_path):
    toml = tmp_path / "serve.toml"
    toml.write_text('host = "0.0.0.0"\napi_keys = ["sk-file"]\nrate_limit_per_minute = 60\n'
                    'model_aliases = ["my-gpt"]\n[engine]\nmax_running = 4\n')
    s = ServeSettings.load(toml, env={"PAGODA_API_KEYS": "sk-env1, sk-env2"}, port=9000,
                           api_keys=["sk-flag"], engine={"max_waiting": 3}, host=None)
    assert s.host == "0.0.0.0" and s.port == 9000 and s.rate_limit_per_minute == 60
    assert s.api_keys == ["sk-file", "sk-env1", "sk-env2", "sk-flag"]
    assert s.model_aliases == ["my-gpt"] and s.engine == {"max_running": 4, "max_waiting": 3}
    cfg = s.engine_config()
    assert cfg.max_running == 4 and cfg.max_waiting == 3

    js = tmp_path / "serve.json"
    js.write_text(json.dumps({"log_prompts": True, "default_max_tokens": 64}))
    s = ServeSettings.load(js, env={})
    assert s.log_prompts and s.default_max_tokens == 64 and s.api_keys == []
    assert s.model_aliases == ["deepseek-chat", "gpt-3.5-turbo", "gpt-4o-mini"]


@pytest.mark.parametrize(("text", "suffix", "match"), [
    ("hots = 1", ".toml", "unknown serve setting"),
    ("port = 'eighty'", ".toml", "port"),
    ("{not json", ".json", "not valid JSON"),
    ("[1, 2]", ".json", "table/object"),
    ("rate_limit_per_minute = -1", ".toml", "rate_limit_per_minute"),
    ("api_keys = 'sk-one'", ".toml", "api_keys"),
    ("[engine]\nmax_runing = 3", ".toml", None),
])
def test_bad_settings_files_name_the_problem(tmp_path, text, suffix, match):
    path = tmp_path / f"s{suffix}"
    path.write_text(text)
    if match is None:  # unknown engine fields surface when the EngineConfig is built
        with pytest.raises(ConfigError, match="unknown engine setting"):
            ServeSettings.load(path, env={}).engine_config()
        return
    with pytest.raises(ConfigError, match=match):
        ServeSettings.load(path, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        ServeSettings.load(tmp_path / "missing.toml", env={})
