"""Server settings: defaults, then a settings file (`--config`, JSON or TOML), then environment
variables, then command-line flags; each layer overrides the one before.

A settings file holds the same keys as `ServeSettings`, e.g. (TOML):

    host = "0.0.0.0"
    api_keys = ["sk-local-1"]
    rate_limit_per_minute = 120
    model_aliases = ["deepseek-chat", "gpt-4o-mini"]
    [engine]              # fields of pagoda.infer.engine.EngineConfig
    max_running = 32
    kv_cache_tokens = 65536

    [adapters]            # LoRA adapters: request them as "model": "BASE:contracts"
    contracts = "runs/contracts-lora"

Environment: PAGODA_API_KEYS (comma-separated keys; added to those of the file).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagoda.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"
# Names OpenAI/DeepSeek clients send by default; they all resolve to the one served model.
DEFAULT_ALIASES = ("deepseek-chat", "gpt-3.5-turbo", "gpt-4o-mini")
DEFAULT_EMBEDDING_MODEL = "minilm-l6"
EMBEDDING_ALIASES = ("text-embedding-3-small", "text-embedding-ada-002")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
ADAPTER_NAME = re.compile(r"[\w.-]{1,64}")


@dataclass
class ServeSettings:
    """Everything `pagoda serve` can be told; see the module docstring for where it comes from."""

    # Model name (see `pagoda list`) or path of a GGUF file / HF checkpoint folder.
    model: str = DEFAULT_MODEL
    # Address to bind; anything but loopback needs api_keys.
    host: str = "127.0.0.1"
    port: int = 8000
    # Bearer keys accepted on /v1/*; empty: no auth, and the server binds loopback only.
    api_keys: list[str] = field(default_factory=list)
    # Name /v1/models reports for the served model; None: the model name (a path's file stem).
    served_model_name: str | None = None
    # Other model names clients may send that resolve to the served model.
    model_aliases: list[str] = field(default_factory=lambda: list(DEFAULT_ALIASES))
    # Requests per minute per API key (per client address without keys); 0 turns it off.
    rate_limit_per_minute: int = 0
    # max_tokens of chat requests that set none; None: until EOS or the context window is full
    # (OpenAI's behaviour). A cap keeps one rambling request from holding a slot for long.
    default_max_tokens: int | None = None
    # Put prompt text in the access log (off: prompts can hold personal data).
    log_prompts: bool = False
    # Embedding model of /v1/embeddings and the knowledge bases, pulled and loaded on first use.
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    # Other names embedding clients may send for it (OpenAI SDK defaults).
    embedding_aliases: list[str] = field(default_factory=lambda: list(EMBEDDING_ALIASES))
    # Vector database of the knowledge bases: None is Milvus Lite under $PAGODA_HOME; else a URI
    # of pagoda.rag.databases.open_database: sqlite:///path/kb.sqlite (one file several
    # processes share), a Milvus Lite .db path, or a Milvus server such as http://milvus:19530.
    vector_store: str | None = None
    # The older name of vector_store, still read; vector_store wins when both are set.
    milvus_uri: str | None = None
    # Folder of the knowledge-base manifests; None: $PAGODA_HOME/kb.
    kb_dir: str | None = None
    # Largest document upload accepted, per file, and webhook body (413 beyond it).
    max_upload_mb: int = 50
    # Shared secret of POST /v1/data/{dataset}/webhook: when set, a delivery must carry
    # 'X-Pagoda-Signature: sha256=<hex HMAC-SHA256 of the body>' (401 otherwise).
    webhook_secret: str | None = None
    # Fields of pagoda.infer.engine.EngineConfig to override (max_running, max_waiting, ...).
    engine: dict[str, Any] = field(default_factory=dict)
    # LoRA adapters to load at start, name -> PEFT adapter folder; requests pick one with
    # "model": "BASE:NAME" (more can be loaded at run time: POST /v1/load_lora_adapter).
    adapters: dict[str, str] = field(default_factory=dict)
    # Keys that may load and unload adapters (they are API keys too). With auth off (loopback
    # only) anyone local may; with api_keys but no admin_keys, nobody may at run time.
    admin_keys: list[str] = field(default_factory=list)
    # Device and dtype to load the model on (None: best available).
    device: str | None = None
    dtype: str | None = None

    @classmethod
    def load(cls, config: str | os.PathLike[str] | None = None,
             env: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        """Defaults < settings file < environment < overrides (None overrides are skipped)."""
        values: dict[str, Any] = {}
        if config is not None:
            values.update(read_settings_file(Path(config)))
        env = os.environ if env is None else env
        env_keys = [k.strip() for k in env.get("PAGODA_API_KEYS", "").split(",") if k.strip()]
        if env_keys:
            values["api_keys"] = [*values.get("api_keys", []), *env_keys]
        for name, value in overrides.items():
            if value is None:
                continue
            if name == "api_keys":
                value = [*values.get("api_keys", []), *value]
            elif name in ("engine", "adapters"):
                value = {**values.get(name, {}), **value}
            values[name] = value
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown serve setting(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ConfigError for values that cannot work."""
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be an integer in 0..65535, got {self.port!r}")
        if not isinstance(self.api_keys, list) or not all(
                isinstance(k, str) and k for k in self.api_keys):
            raise ConfigError("api_keys must be a list of non-empty strings")
        if not isinstance(self.model_aliases, list) or not all(
                isinstance(a, str) for a in self.model_aliases):
            raise ConfigError("model_aliases must be a list of model names")
        if not isinstance(self.rate_limit_per_minute, int) or self.rate_limit_per_minute < 0:
            raise ConfigError("rate_limit_per_minute must be an integer >= 0 (0 turns it off), "
                              f"got {self.rate_limit_per_minute!r}")
        if self.default_max_tokens is not None and (
                not isinstance(self.default_max_tokens, int) or self.default_max_tokens < 1):
            raise ConfigError("default_max_tokens must be an integer >= 1 or null, "
                              f"got {self.default_max_tokens!r}")
        if not isinstance(self.engine, dict):
            raise ConfigError("engine must be a table of EngineConfig fields")
        if not isinstance(self.adapters, dict) or not all(
                isinstance(v, str) for v in self.adapters.values()):
            raise ConfigError("adapters must map adapter names to adapter folders")
        for name in self.adapters:
            check_adapter_name(name)
        if not isinstance(self.admin_keys, list) or not all(
                isinstance(k, str) and k for k in self.admin_keys):
            raise ConfigError("admin_keys must be a list of non-empty strings")
        if self.webhook_secret is not None and (
                not isinstance(self.webhook_secret, str) or not self.webhook_secret):
            raise ConfigError("webhook_secret must be a non-empty string or null")

    @property
    def vector_store_uri(self) -> str | None:
        """The knowledge bases' vector database: vector_store, else milvus_uri, else None."""
        return self.vector_store or self.milvus_uri

    @property
    def auth_enabled(self) -> bool:
        """Whether /v1/* needs an API key."""
        return bool(self.api_keys or self.admin_keys)

    def engine_config(self) -> Any:
        """The EngineConfig these settings describe (unknown fields raise ConfigError)."""
        from pagoda.infer.engine import EngineConfig

        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(self.engine) - known)
        if unknown:
            raise ConfigError(f"unknown engine setting(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        return EngineConfig(**self.engine)


def check_adapter_name(name: object) -> str:
    """An adapter name usable after the ':' of "BASE:NAME" (ConfigError otherwise)."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ConfigError(f"bad adapter name {name!r}: use 1-64 letters, digits, '_', '-' or '.'")
    return name


def read_settings_file(path: Path) -> dict[str, Any]:
    """Keys of a JSON (.json) or TOML (anything else) settings file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read settings file {path}: {e.strerror or e}") from e
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"settings file {path} is not valid "
                          f"{'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"settings file {path} must hold a table/object of settings")
    return data
