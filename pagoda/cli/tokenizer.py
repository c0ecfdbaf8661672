"""`pagoda tokenizer train`: a byte-level BPE or character tokenizer from text files, with its
compression on held-out text next to reference tokenizers (SmolLM2's when it is pulled)."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from pagoda.cli import add_group, add_verb
from pagoda.data.tokenize import load_tokenizer
from pagoda.errors import PagodaError
from pagoda.tokenizer import Tokenizer
from pagoda.tokenizer.train import KINDS, train_tokenizer

REFERENCES = ("smollm2-135m-instruct",)
# No GPT-2 tokenizer ships with Pagoda or its dependencies, so none is compared by default.
NO_GPT2 = "no GPT-2 tokenizer is available offline; pass one with --compare PATH"


def register(subparsers: argparse._SubParsersAction) -> None:
    sub = add_group(subparsers, "tokenizer", "train tokenizers",
                    "Tokenizers: train a byte-level BPE (chat special tokens reserved) or a "
                    "character-level one on your own text.",
                    "pagoda tokenizer train --input corpus.txt --vocab-size 8192 --out tok/")
    p = add_verb(sub, "train", "train a tokenizer and report its compression on held-out text",
                 "pagoda tokenizer train --input shakespeare.txt --vocab-size 2048 --out tok/",
                 cmd_train)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text, Markdown or JSONL files, or folders of them")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="tokens in the vocabulary, special tokens included (needed for bpe)")
    p.add_argument("--out", required=True, help="folder for tokenizer.json")
    p.add_argument("--kind", choices=KINDS, default="bpe",
                   help="bpe (byte-level, default) or char (the input's characters)")
    p.add_argument("--held-out-fraction", type=float, default=0.01,
                   help="last part of the input kept out of training to measure compression "
                        "(0.01)")
    p.add_argument("--compare", nargs="*", default=list(REFERENCES), metavar="NAME",
                   help="tokenizers to compare with: tokenizer folders or model names "
                        f"(default {' '.join(REFERENCES)}, when pulled)")


def _references(names: list[str]) -> tuple[dict[str, Tokenizer], dict[str, str]]:
    """The reference tokenizers that can be had without a download, and why others cannot."""
    found, skipped = {}, {"gpt2": NO_GPT2}
    for name in names:
        try:
            found[name] = load_tokenizer(name, pull=False)
        except PagodaError as exc:
            skipped[name] = str(exc)
    return found, skipped


def cmd_train(args: argparse.Namespace) -> None:
    references, skipped = _references(args.compare)
    report = train_tokenizer(args.input, args.vocab_size, args.out, kind=args.kind,
                             held_out_fraction=args.held_out_fraction, references=references)
    vocab = {"trained": report.vocab_size} | {n: t.vocab_size for n, t in references.items()}
    if args.json:
        print(json.dumps(report.to_dict() | {"reference_vocab_sizes": vocab, "skipped": skipped},
                         ensure_ascii=False))
        return
    print(f"trained a {report.kind} tokenizer of {report.vocab_size} tokens on "
          f"{report.train_bytes:,} bytes in {report.seconds:.1f} s; saved to {report.out_dir}")
    table = Table(title=f"compression on {report.held_out_bytes:,} held-out bytes")
    for column in ("tokenizer", "vocab", "bytes/token (higher is better)"):
        table.add_column(column)
    for name, value in report.bytes_per_token.items():
        table.add_row(name, f"{vocab[name]:,}", f"{value:.3f}")
    Console().print(table)
    for name, reason in skipped.items():
        print(f"not compared: {name}: {reason}")
