"""`pagoda finetune MODEL DATA --method ...`: supervised fine-tuning on a chat file (see
docs/finetuning.md); a thin layer over `pagoda.train.finetune.finetune`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from pagoda.cli import add_verb
from pagoda.hub.loader import load_model
from pagoda.train.finetune import METHODS, FinetuneConfig, finetune

# command-line option -> FinetuneConfig field (None: not given, keep the default)
OPTIONS = {"out": "out_dir", "epochs": "epochs", "max_steps": "max_steps", "minutes": "max_minutes",
           "lr": "lr", "batch_size": "batch_size", "grad_accum": "grad_accum",
           "seq_len": "seq_len", "val_fraction": "val_fraction", "rank": "lora_r",
           "alpha": "lora_alpha", "bits": "qlora_bits", "virtual_tokens": "num_virtual_tokens",
           "freeze_layers": "freeze_layers", "device": "device", "seed": "seed"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_verb(subparsers, "finetune",
                 "fine-tune a model on chat data: full, freeze, lora, qlora, prompt or ptuning",
                 "pagoda finetune smollm2-135m-instruct train.jsonl --method lora --rank 16 "
                 "--epochs 2 --out runs/my-lora", cmd_finetune)
    p.add_argument("model", help="model name or path (see `pagoda list`)")
    p.add_argument("data", help="a .jsonl/.json file of OpenAI, ShareGPT or Alpaca records")
    p.add_argument("--method", choices=METHODS, default="lora", help="what trains (default lora)")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/finetune/MODEL-METHOD)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the data (3)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps; overrides epochs")
    p.add_argument("--minutes", type=float, default=None, help="time budget for training")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default per method: full 2e-5, freeze 5e-5, "
                        "lora/qlora 2e-4, prompt 3e-2, ptuning 1e-2)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per micro-batch (4)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (1)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (1024)")
    p.add_argument("--val-fraction", type=float, default=None, help="held out (0.05)")
    p.add_argument("--rank", type=int, default=None, help="lora/qlora rank r (8)")
    p.add_argument("--alpha", type=float, default=None, help="lora/qlora alpha (16)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=None,
                   help="qlora: base weight bits (4)")
    p.add_argument("--virtual-tokens", type=int, default=None,
                   help="prompt/ptuning: virtual tokens (20)")
    p.add_argument("--freeze-layers", type=int, default=None,
                   help="freeze: bottom N blocks frozen; negative: all but the top |N| (-2)")
    p.add_argument("--merge", action="store_true",
                   help="lora/qlora: also save the merged model in OUT/merged")
    p.add_argument("--no-pack", action="store_true",
                   help="one example per row instead of packing several")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: best available)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any FinetuneConfig field, e.g. --set lora_dropout=0.1 (repeatable)")


def build_config(args: argparse.Namespace) -> FinetuneConfig:
    """FinetuneConfig from the options given; --set applies last."""
    values = {field: getattr(args, option) for option, field in OPTIONS.items()
              if getattr(args, option) is not None}
    values["method"] = args.method
    values.setdefault("out_dir", str(Path("runs") / "finetune" /
                                     f"{Path(args.model).stem or args.model}-{args.method}"))
    values["merge"], values["pack"] = args.merge, not args.no_pack
    values["progress"] = not args.json
    cfg = dataclasses.replace(FinetuneConfig(), **values).with_overrides(args.set)
    cfg.validate()
    return cfg


def cmd_finetune(args: argparse.Namespace) -> None:
    cfg = build_config(args)
    loaded = load_model(args.model, device=None if cfg.device == "auto" else cfg.device,
                        dtype="fp32")  # fp32 master weights; autocast is cfg.dtype
    result = finetune(loaded.model, loaded.tokenizer, args.data, cfg, base_model=args.model)
    if args.json:
        print(json.dumps(result))
        return
    val = (f", val loss {result['val_loss_before']:.4f} -> {result['val_loss']:.4f}"
           if result["val_loss"] is not None else "")
    merged = f"; merged model in {result['merged']}" if result["merged"] else ""
    print(f"{result['method']}: {result['steps']} steps in {result['train_minutes']:.1f} min, "
          f"loss {result['train_loss']:.4f}{val}; trained {result['trainable']:,} parameters "
          f"({result['trainable_pct']:.3f}%), peak RSS {result['peak_rss_mb']:.0f} MB; "
          f"saved to {result['artifact']}{merged}")
