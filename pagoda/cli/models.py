"""Verbs about models themselves: `pull`, `list`, `params`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pagoda.cli import add_verb
from pagoda.errors import ConfigError
from pagoda.hub import KNOWN_MODELS, list_pulled, model_file, pull, resolve
from pagoda.model.config import ModelConfig
from pagoda.model.params import count_parameters, human_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_verb(subparsers, "pull", "download a model into $PAGODA_HOME",
                 "pagoda pull smollm2-135m-instruct", cmd_pull)
    p.add_argument("name", help=f"a known model ({', '.join(KNOWN_MODELS)}), hf:ORG/NAME, "
                                "or a local path")
    p.add_argument("--force", action="store_true", help="download again even if present")

    add_verb(subparsers, "list", "show pulled models and the ones available to pull",
             "pagoda list --json", cmd_list)

    p = add_verb(subparsers, "params", "exact parameter count, memory and KV-cache size",
                 "pagoda params gpt3-175b", cmd_params)
    p.add_argument("name", help="a preset (e.g. smollm2-135m, gpt2, gpt3-175b), a config JSON, "
                                "a pulled model name, or a model path")


def cmd_pull(args: argparse.Namespace) -> None:
    path = pull(args.name, force=args.force, progress=not args.json)
    if args.json:
        print(json.dumps({"name": args.name, "path": str(path)}))
    else:
        print(f"{args.name} is ready at {path}")


def cmd_list(args: argparse.Namespace) -> None:
    pulled = list_pulled()
    if args.json:
        print(json.dumps({
            "pulled": [{"name": m.name, "path": str(m.path), "format": m.format,
                        "size_bytes": m.size_bytes, "source": m.source} for m in pulled],
            "available": {name: src.description for name, src in KNOWN_MODELS.items()}}))
        return
    table = Table(title="Models")
    for column in ("name", "status", "format", "size", "description / path"):
        table.add_column(column)
    names = {m.name for m in pulled}
    for m in pulled:
        table.add_row(m.name, "pulled", m.format, human_bytes(m.size_bytes), str(m.path))
    for name, src in KNOWN_MODELS.items():
        if name not in names:
            table.add_row(name, "available", "", "", src.description)
    Console().print(table)


def config_for(name: str) -> ModelConfig:
    """Config of a preset, a config file, or a pulled/local model (header only, no weights)."""
    from pagoda.model.gguf_io import gguf_config
    from pagoda.model.hf_checkpoint import read_config
    from pagoda.model.hf_config import config_from_hf
    from pagoda.model.presets import PRESETS

    if name in PRESETS:
        return ModelConfig.from_name(name)
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text())
        return config_from_hf(data, path.stem) if "model_type" in data else \
            ModelConfig.from_dict(data)
    try:
        target = model_file(resolve(name, pull_if_missing=False))
    except Exception as exc:
        raise ConfigError(f"{name!r} is not a preset ({', '.join(PRESETS)}), a config file, "
                          f"or a pulled model: {exc}") from exc
    return gguf_config(target) if target.suffix == ".gguf" else read_config(target)


def cmd_params(args: argparse.Namespace) -> None:
    report = count_parameters(config_for(args.name))
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        report.render(Console())
