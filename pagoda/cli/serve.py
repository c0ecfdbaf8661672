"""Verb `serve`: the OpenAI-compatible API (and web UI at /) over the engine, with uvicorn."""

from __future__ import annotations

import argparse
import logging

from pagoda.cli import add_verb
from pagoda.cli.generate import DEFAULT_MODEL
from pagoda.errors import ConfigError

log = logging.getLogger("pagoda.serve")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` verb."""
    p = add_verb(subparsers, "serve",
                 "serve a model over an OpenAI-compatible HTTP API (and the web chat UI at /)",
                 "pagoda serve --port 8000   # then: curl http://127.0.0.1:8000/v1/models",
                 cmd_serve)
    p.add_argument("--model", default=None,
                   help=f"model name or path (default {DEFAULT_MODEL}, pulled on first use)")
    p.add_argument("--embedding-model", default=None,
                   help="model of /v1/embeddings (default minilm-l6, pulled on first use)")
    p.add_argument("--host", default=None,
                   help="address to bind (default 127.0.0.1; any other address needs API keys)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--api-key", action="append", dest="api_keys", default=None, metavar="KEY",
                   help="accept this Bearer key on /v1/* (repeatable; also PAGODA_API_KEYS)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="settings file (JSON or TOML) with ServeSettings keys")
    p.add_argument("--rate-limit", type=int, default=None, dest="rate_limit_per_minute",
                   metavar="N", help="requests per minute per key (0 = off)")
    p.add_argument("--log-prompts", action="store_true", default=None,
                   help="put prompt text in the access log (off by default)")
    p.add_argument("--max-running", type=int, default=None,
                   help="sequences decoded together (continuous batching)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="waiting-queue cap; beyond it requests get 503")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV-cache pool size in tokens")
    p.add_argument("--no-prefix-caching", action="store_false", default=None,
                   dest="prefix_caching", help="recompute every prompt in full instead of "
                   "reusing the KV blocks of prefixes computed before")
    p.add_argument("--adapter", action="append", default=None, metavar="NAME=PATH",
                   help="serve a PEFT LoRA adapter folder too; requests pick it with "
                        "\"model\": \"BASE:NAME\" (repeatable)")
    p.add_argument("--admin-key", action="append", dest="admin_keys", default=None,
                   metavar="KEY", help="key that may also load/unload adapters at run time "
                                       "(repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: best available)")
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: best for device)")


def cmd_serve(args: argparse.Namespace) -> None:
    """Load the settings and the model, then run the app with uvicorn until interrupted."""
    import uvicorn

    from pagoda.hub.loader import load_model
    from pagoda.serve import ServeSettings, create_app
    from pagoda.serve.auth import check_bind
    from pagoda.serve.logs import setup_logging

    setup_logging(logging.DEBUG if args.debug else logging.INFO)
    engine = {k: v for k in ("max_running", "max_waiting", "kv_cache_tokens", "prefix_caching")
              if (v := getattr(args, k)) is not None}
    settings = ServeSettings.load(
        args.config, model=args.model, embedding_model=args.embedding_model, host=args.host,
        port=args.port, api_keys=args.api_keys,
        rate_limit_per_minute=args.rate_limit_per_minute, log_prompts=args.log_prompts,
        engine=engine or None, device=args.device, dtype=args.dtype,
        adapters=_adapters(args.adapter), admin_keys=args.admin_keys)
    check_bind(settings)  # before the slow load: refuse an open address without keys
    settings.engine_config()  # unknown engine settings fail now, not after loading
    log.info("loading %s ...", settings.model)
    loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype)
    app = create_app(loaded, settings)
    log.info("listening on http://%s:%d (OpenAI base_url http://%s:%d/v1)", settings.host,
             settings.port, settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False,
                log_level="debug" if args.debug else "warning")


def _adapters(specs: list[str] | None) -> dict[str, str] | None:
    """--adapter NAME=PATH flags as a name -> folder table (ConfigError on a bad one)."""
    if not specs:
        return None
    table: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter takes NAME=PATH (a PEFT adapter folder), got {spec!r}")
        if name in table:
            raise ConfigError(f"--adapter {name!r} is given twice")
        table[name] = path
    return table
