"""`pagoda pretrain CONFIG.yaml`: train a model from scratch (see docs/training.md)."""

from __future__ import annotations

import argparse
import json

from pagoda.cli import add_verb
from pagoda.train import load_config, pretrain
from pagoda.train.config import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_verb(subparsers, "pretrain", "pretrain a model on token shards from a YAML config",
                 "pagoda pretrain configs/pretrain/baby-gpt-shakespeare.yaml "
                 "--set train.max_steps=100", cmd_pretrain)
    add_config_arguments(p)


def cmd_pretrain(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.set)
    if args.json:
        cfg.train.progress = False
    summary = pretrain(cfg)
    if summary["rank"]:  # under torchrun only rank 0 reports
        return
    if args.json:
        print(json.dumps(summary))
        return
    val = f", val loss {summary['val_loss']:.4f}" if "val_loss" in summary else ""
    print(f"trained {summary['steps']} steps in {summary['wall_s']:.1f} s "
          f"({summary['tok_s']:.0f} tok/s): loss {summary.get('loss', float('nan')):.4f}{val}; "
          f"checkpoints in {summary['out_dir']}")
