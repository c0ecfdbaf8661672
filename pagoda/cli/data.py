"""`pagoda data tokenize`: text files and JSONL into memory-mapped token shards for training."""

from __future__ import annotations

import argparse
import json

from pagoda.cli import add_group, add_verb
from pagoda.data.tokenize import tokenize_corpus


def register(subparsers: argparse._SubParsersAction) -> None:
    sub = add_group(subparsers, "data", "prepare training data",
                    "Training data: turn text corpora into token shards (uint16/uint32 .bin "
                    "files with an index.json) that `pagoda pretrain` reads.",
                    "pagoda data tokenize corpus/ --tokenizer tok/ --out shards/")
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
