"""`pagoda data prepare` (raw documents into clean, deduplicated, PII-masked training data) and
`pagoda data tokenize` (text files and JSONL into memory-mapped token shards)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pagoda.cli import add_group, add_verb
from pagoda.data.tokenize import tokenize_corpus


def register(subparsers: argparse._SubParsersAction) -> None:
    sub = add_group(subparsers, "data", "prepare training data",
                    "Training data: collect, clean, deduplicate and mask documents into "
                    "data.jsonl with a manifest (prepare), and turn text corpora into token "
                    "shards (uint16/uint32 .bin files with an index.json) that `pagoda "
                    "pretrain` reads (tokenize).",
                    "pagoda data prepare docs/ crawl.jsonl --out prepared/")
    p = add_verb(sub, "prepare", "clean, deduplicate and PII-mask documents into data.jsonl",
                 "pagoda data prepare docs/ https://example.com/ --out prepared/ "
                 "--config pipeline.yaml --set dedup.threshold=0.7 --tokenizer tok/",
                 cmd_prepare)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files (txt, md, html, pdf, docx, jsonl, json, csv), folders, or "
                        "http(s) URLs to crawl")
    p.add_argument("--out", required=True,
                   help="output folder: data.jsonl, manifest.json, manifest.md (replaced "
                        "whole at the end of the run)")
    p.add_argument("--config", help="pipeline YAML (sections: collect, crawl, clean, quality, "
                                    "dedup, pii, balance, stages, output; see docs/data.md)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field, e.g. --set quality.languages=en,zh (repeatable)")
    p.add_argument("--tokenizer", help="also write token shards with this tokenizer (a folder, "
                                       "tokenizer.json or a model name)")
    p.add_argument("--workers", type=int, help="worker processes (default: one per core); "
                                               "with --ray and no cluster, local Ray's CPUs")
    p.add_argument("--ray", action="store_true",
                   help="run the per-record stages on Ray Data: the cluster at RAY_ADDRESS, "
                        "else a local Ray (pip install 'pagoda[ray]')")
    p = add_verb(sub, "tokenize", "tokenize text/JSONL files into train and validation shards",
                 "pagoda data tokenize shakespeare.txt --tokenizer tok/ --out shards/ "
                 "--val-fraction 0.1", cmd_tokenize)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text files (one document each), JSONL files (one per line), folders")
    p.add_argument("--tokenizer", required=True,
                   help="a tokenizer folder or tokenizer.json, or a model name "
                        "(e.g. smollm2-135m-instruct)")
    p.add_argument("--out", required=True, help="folder for the shards and index.json")
    p.add_argument("--val-fraction", type=float, default=0.005,
                   help="share of documents (of tokens, for a single text file) held out for "
                        "validation (0.005)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizing processes (default: one per core)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (text)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000,
                   help="tokens per .bin file (100,000,000)")


def cmd_prepare(args: argparse.Namespace) -> None:
    from pagoda.data.pipeline import load_pipeline_config, prepare

    overrides = list(args.set)
    if args.tokenizer:
        overrides.append(f"output.tokenizer={args.tokenizer}")
    if args.workers is not None:
        overrides.append(f"output.workers={args.workers}")
    config = load_pipeline_config(args.config, overrides)
    if args.ray:
        from pagoda.data.ray_runner import prepare_on_ray

        manifest = prepare_on_ray(args.inputs, args.out, config, progress=not args.json)
    else:
        manifest = prepare(args.inputs, args.out, config, progress=not args.json)
    if args.json:
        print(json.dumps({"out": args.out, **manifest}, ensure_ascii=False))
        return
    mb = manifest["input_bytes"] / 1e6
    print(f"{args.out}: {manifest['output']['records']:,} records from "
          f"{manifest['input_records']:,} ({mb:.1f} MB in {manifest['elapsed_s']:.1f} s, "
          f"{mb / max(manifest['elapsed_s'], 1e-3):.1f} MB/s)\n")
    print(Path(args.out, "manifest.md").read_text(), end="")


def cmd_tokenize(args: argparse.Namespace) -> None:
    index = tokenize_corpus(args.inputs, args.tokenizer, args.out,
                            val_fraction=args.val_fraction, workers=args.workers,
                            text_field=args.text_field, shard_tokens=args.shard_tokens,
                            progress=not args.json)
    if args.json:
        print(json.dumps({"out": args.out, **index}))
        return
    print(f"{args.out}: vocabulary {index['vocab_size']:,}, {index['dtype']}, separator id "
          f"{index['eot_id']}")
    for name, split in index["splits"].items():
        print(f"  {name:5} {split['tokens']:>14,} tokens  {split['documents']:>10,} documents  "
              f"{len(split['files'])} files")
