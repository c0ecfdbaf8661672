"""Reproduce nanoGPT's "baby GPT" on tiny Shakespeare (character level) with `pagoda pretrain`.

nanoGPT's README: on a laptop CPU, config/train_shakespeare_char.py with --device=cpu
--compile=False --eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
--n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 reaches a validation loss of
about 1.88 in about 3 minutes. This script builds the same data (a char tokenizer over the
whole text, the last 10% held out) and runs configs/pretrain/baby-gpt-shakespeare.yaml.

With `--tokenizer bpe` the same model and schedule train on the same text through a byte-level
BPE tokenizer trained on it (`--vocab-size`, default 512): fewer, richer tokens per window. Its
loss is per token, so the JSON also gives the validation loss per character (loss × tokens /
characters of the validation split), which is comparable with the char-level run's.

    python benchmarks/pretrain_shakespeare.py [--steps 2000] [--threads N]
    python benchmarks/pretrain_shakespeare.py --tokenizer bpe --vocab-size 512

Writes benchmarks/results/pretrain_shakespeare.json and .png (loss curves; `-bpe` for BPE); the
last stdout line is one JSON object with val_loss, wall_s and tok_s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, pyplot, save_png, write_json  # noqa: E402

from pagoda.data.shards import TokenShards  # noqa: E402
from pagoda.data.tokenize import tokenize_corpus  # noqa: E402
from pagoda.model.transformer import Transformer  # noqa: E402
from pagoda.tokenizer import Tokenizer  # noqa: E402
from pagoda.tokenizer.train import train_tokenizer  # noqa: E402
from pagoda.train import load_config, pretrain  # noqa: E402
from pagoda.train.checkpoint import latest_checkpoint, load_weights  # noqa: E402
from pagoda.train.objectives import causal_lm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
CONFIG = ROOT / "configs" / "pretrain" / "baby-gpt-shakespeare.yaml"
RESULTS = ROOT / "benchmarks" / "results"
TARGET = 1.88  # nanoGPT's reported validation loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tokenizer", choices=("char", "bpe"), default="char",
                        help="char: nanoGPT's 65-character vocabulary (the reproduction); bpe: a "
                        "byte-level BPE trained on the text")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary (512)")
    parser.add_argument("--seed", type=int, default=1337, help="the run's seed (nanoGPT's 1337)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bpe = args.tokenizer == "bpe"
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        train_tokenizer([TEXT], args.vocab_size if bpe else None, work / "tok",
                        kind=args.tokenizer, held_out_fraction=0.0)
        index = tokenize_corpus([TEXT], work / "tok", work / "shards", val_fraction=0.1)
        val_chars = len(Tokenizer.from_file(work / "tok").decode(
            TokenShards.open(work / "shards", "val").read(0, index["splits"]["val"]["tokens"])
            .tolist()))
        cfg = load_config(CONFIG, [f"data.shards={work / 'shards'}",
                                   f"train.out_dir={work / 'run'}",
                                   f"train.max_steps={args.steps}", f"train.seed={args.seed}",
                                   "train.progress=false"])
        started = time.perf_counter()
        summary = pretrain(cfg)
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text()
                   .splitlines()]
        full_val = whole_split_loss(latest_checkpoint(work / "run"), work / "shards", cfg)
    tokens_per_char = index["splits"]["val"]["tokens"] / val_chars
    result = {"tokenizer": args.tokenizer, "vocab_size": index["vocab_size"],
              "val_loss": summary["val_loss"], "wall_s": round(wall, 1),
              "val_loss_per_char": round(summary["val_loss"] * tokens_per_char, 4),
              "val_loss_whole_split": round(full_val, 4), "seed": args.seed,
              "tokens_per_char": round(tokens_per_char, 4),
              "tok_s": round(summary["tok_s"], 1), "target_val_loss": TARGET,
              "reached_target": not bpe and summary["val_loss"] <= TARGET,
              "steps": summary["steps"],
              "final_train_loss": summary["loss"], "mfu": summary["mfu"],
              "sample": next((r["sample"] for r in reversed(records) if "sample" in r), None),
              "curve": [{k: r[k] for k in ("step", "loss", "val_loss") if k in r}
                        for r in records if "val_loss" in r or r["step"] % 10 == 0],
              "config": cfg.to_dict(), "machine": machine_info(args.threads)}
    name = "pretrain_shakespeare" + ("-bpe" if bpe else "")
    write_json(result, RESULTS / f"{name}.json")
    plot(records, RESULTS / f"{name}.png", args.tokenizer)
    print(f"sample:\n{result['sample']}\n")
    print(f"val loss {result['val_loss']:.4f} per token, {result['val_loss_per_char']:.4f} per "
          f"character (nanoGPT, char-level: ~{TARGET}) after {result['steps']} steps in "
          f"{wall:.0f} s, {result['tok_s']:.0f} tokens/s; over every validation window "
          f"{full_val:.4f}")
    print(json.dumps({k: result[k] for k in ("val_loss", "wall_s", "tok_s",
                                              "val_loss_whole_split")}))


@torch.no_grad()
def whole_split_loss(checkpoint: Path, shards: Path, cfg) -> float:
    """Mean loss of the final model over every non-overlapping window of the validation split:
    the number nanoGPT's 20 random batches estimate (about ±0.02), without their noise."""
    val = TokenShards.open(shards, "val")
    model = Transformer(cfg.model_config(val.vocab_size)).eval()
    load_weights(checkpoint, model)
    block = cfg.data.block_size
    windows = torch.from_numpy(val.read(0, (val.tokens - 1) // block * block + 1).astype("int64"))
    x, y = windows[:-1].view(-1, block), windows[1:].view(-1, block)
    losses = [causal_lm(model, xb, yb) * len(xb) for xb, yb in zip(x.split(256), y.split(256),
                                                                   strict=True)]
    return (sum(losses) / len(x)).item()


def plot(records: list[dict], path: Path, tokenizer: str) -> None:
    plt = pyplot(path.name)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=0.6, label="train")
    val = [r for r in records if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    if tokenizer == "char":
        ax.axhline(TARGET, ls="--", color="gray", label=f"nanoGPT val {TARGET}")
    ax.set(xlabel="step", ylabel="loss per token",
           title=f"baby GPT, tiny Shakespeare ({tokenizer})")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    main()
