"""Fine-tuning methods compared on one task: SmolLM2-135M-Instruct learns to extract four fields
from short contracts (benchmarks/finetune_task.py: English and Chinese, held-out names and
templates) as one exact JSON line.

The script writes the train/test sets, measures the base model's held-out exact-match, then for
each method fine-tunes with a time budget (`--minutes`; per method `--method-minutes`) and
scores exact-match on the test set with greedy decoding. Methods that change weights go through the engine
(`pagoda.infer.engine.generate`), LoRA and QLoRA merged first as `--merge` exports them; their
runs check that merging changes nothing (the max |logit| difference between the adapter model
and the merged one). Prompt/ptuning go through `prompt_tuning.generate_ids` (a KV cache after
the virtual tokens), reloaded from the files the run saved. Each method runs in its own process,
so its peak RSS is its own.

    .venv/bin/pagoda pull smollm2-135m-instruct          # once
    python benchmarks/finetune.py                          # all methods, 10 minutes each
    python benchmarks/finetune.py --methods lora --minutes 0.5 --n-train 20 --n-test 5  # smoke

Writes benchmarks/results/finetune.json and .png (exact-match bars); the last stdout line is
one JSON object: {"base_exact_match": x, "methods": {"lora": {"exact_match", "trainable_pct",
"minutes", "peak_rss_mb"}, ...}}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, pyplot, save_png, write_json  # noqa: E402
from finetune_task import exact_match, write_task  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m-instruct"
METHODS = ("lora", "qlora", "prompt", "ptuning", "freeze", "full")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)} (default: all)")
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="training time budget per method (default 10)")
    parser.add_argument("--method-minutes", action="append", default=[], metavar="METHOD=MIN",
                        help="a method's own time budget, e.g. lora=10 (repeatable)")
    parser.add_argument("--n-train", type=int, default=2000, help="training examples (2000)")
    parser.add_argument("--n-test", type=int, default=200, help="held-out examples (200)")
    parser.add_argument("--epochs", type=float, default=3.0,
                        help="most passes over the training set within the budget (3)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch (4)")
    parser.add_argument("--grad-accum", type=int, default=2,
                        help="micro-batches per step (2): 8 rows of 512 tokens per step")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                        help="override a method's default learning rate (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a FinetuneConfig field for every method (repeatable)")
    parser.add_argument("--eval-batch", type=int, default=16, help="prompts decoded together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--model", default=MODEL, help=f"model name or path ({MODEL})")
    parser.add_argument("--work", default=None,
                        help="folder for data and runs (default: a temporary one)")
    parser.add_argument("--results", default=str(RESULTS / "finetune.json"),
                        help="results JSON (the PNG goes next to it)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # base or a method
    args = parser.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        args.budget = {m: float(v) for m, v in (x.split("=", 1) for x in args.method_minutes)}
    except ValueError:
        parser.error("--method-minutes takes METHOD=MINUTES, e.g. lora=10")
    unknown = sorted(set(args.method_list) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return args


# ------------------------------------------------------------------ worker (one process each)
def load_test(path: Path, tokenizer) -> tuple[list[list[int]], list[str]]:
    """Prompt ids (system + user, with the generation prompt) and gold replies."""
    from pagoda.tokenizer import render_chat

    prompts, golds = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        prompts.append(tokenizer.encode(render_chat(tokenizer, messages[:-1])))
        golds.append(messages[-1]["content"])
    return prompts, golds


def engine_replies(model, tokenizer, prompts: list[list[int]], max_new: int,
                   batch: int) -> list[str]:
    """Greedy replies through the serving engine, `batch` prompts at a time."""
    from pagoda.infer.engine import generate
    from pagoda.infer.sampling import SamplingParams

    replies = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        params = [SamplingParams(temperature=0.0, max_tokens=max_new) for _ in chunk]
        ids: list[list[int]] = [[] for _ in chunk]
        for events in generate(model, chunk, params, eos_ids=tokenizer.eos_ids):
            for event in events:
                ids[event.index].append(event.token_id)
        replies += [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    return replies


def tuned_replies(model, tokens, tokenizer, prompts: list[list[int]], max_new: int,
                  batch: int) -> list[str]:
    """Greedy replies after the virtual tokens, with a KV cache."""
    from pagoda.train.prompt_tuning import generate_ids

    replies = []
    for start in range(0, len(prompts), batch):
        out = generate_ids(model, tokens, prompts[start:start + batch], max_new,
                           eos_ids=tokenizer.eos_ids)
        replies += [tokenizer.decode(i, skip_special_tokens=True) for i in out]
    return replies


@torch.no_grad()
def merge_check(model, prompts: list[list[int]]) -> tuple[Any, float]:
    """Merge the active LoRA (QLoRA: into the dequantized base); return the plain model and the
    max |logit| difference on a few prompts between the adapter model and the merged one."""
    from pagoda.model.lora import merge_and_unload
    from pagoda.train.finetune import dequantize_linears

    model.eval().double()  # float64: the difference is the merge's, not float32 rounding
    sample = [torch.tensor([p], device=model.device) for p in prompts[:4]]
    with torch.no_grad():
        before = [model(x) for x in sample]
        dequantize_linears(model)
        merged = merge_and_unload(model)
        diff = max(float((merged(x) - b).abs().max())
                   for x, b in zip(sample, before, strict=True))
    return merged.float(), diff


def worker(args: argparse.Namespace) -> None:
    """Fine-tune one method (or nothing, for "base"), score it, write WORK/METHOD/eval.json."""
    from pagoda.hub.loader import load_model
    from pagoda.train.finetune import FinetuneConfig, finetune, peak_rss_mb
    from pagoda.train.prompt_tuning import load_virtual_tokens

    torch.set_num_threads(args.threads)
    work, method = Path(args.work), args.worker
    loaded = load_model(args.model, device=None if args.device == "auto" else args.device,
                        dtype="fp32")
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts, golds = load_test(work / "task" / "test.jsonl", tokenizer)
    max_new = max(len(tokenizer.encode(g)) for g in golds) + 16
    out = work / method
    record: dict[str, Any] = {"method": method}
    if method != "base":
        lrs = dict(item.split("=", 1) for item in args.lr)
        cfg = FinetuneConfig(method=method, max_minutes=args.minutes, epochs=args.epochs,
                             batch_size=args.batch_size, grad_accum=args.grad_accum,
                             seq_len=args.seq_len, seed=args.seed,
                             out_dir=str(out), device=args.device,
                             lr=float(lrs[method]) if method in lrs else None)
        result = finetune(model, tokenizer, work / "task" / "train.jsonl",
                          cfg.with_overrides(args.set), base_model=args.model)
        record.update({k: result[k] for k in (
            "trainable", "trainable_pct", "minutes", "train_minutes", "steps", "epochs",
            "stopped", "lr", "train_loss", "val_loss_before", "val_loss", "peak_rss_mb",
            "peak_rss_delta_mb", "gpu_peak_mb")})
    started = time.perf_counter()
    if method in ("prompt", "ptuning"):  # reloaded from the saved files
        tokens = load_virtual_tokens(out, model.cfg).to(model.device)
        replies = tuned_replies(model, tokens, tokenizer, prompts, max_new, args.eval_batch)
    else:
        if method in ("lora", "qlora"):
            model, record["merge_max_diff"] = merge_check(model, prompts)
        replies = engine_replies(model, tokenizer, prompts, max_new, args.eval_batch)
    hits = [exact_match(r, g) for r, g in zip(replies, golds, strict=True)]
    record.update(exact_match=sum(hits) / len(hits), n_test=len(hits),
                  eval_minutes=(time.perf_counter() - started) / 60,
                  process_peak_rss_mb=peak_rss_mb(),
                  samples=[{"reply": r, "gold": g}
                           for r, g in zip(replies[:3], golds[:3], strict=True)])
    out.mkdir(parents=True, exist_ok=True)
    write_json(record, out / "eval.json")


# ------------------------------------------------------------------ driver
def run_worker(args: argparse.Namespace, method: str, work: Path) -> dict[str, Any]:
    """Run one method in a fresh process; its eval.json, or an error record."""
    command = [sys.executable, __file__, "--worker", method, "--work", str(work),
               "--model", args.model, "--minutes", str(args.budget.get(method, args.minutes)),
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--grad-accum", str(args.grad_accum),
               "--seq-len", str(args.seq_len), "--eval-batch", str(args.eval_batch),
               "--seed", str(args.seed), "--threads", str(args.threads), "--device", args.device,
               *[f"--lr={x}" for x in args.lr], *[f"--set={x}" for x in args.set]]
    print(f"== {method}", file=sys.stderr, flush=True)
    done = subprocess.run(command, cwd=ROOT)
    path = work / method / "eval.json"
    if done.returncode or not path.is_file():
        return {"method": method, "error": f"worker exited with code {done.returncode}"}
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="pagoda-finetune-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        write_task(work / "task", args.n_train, args.n_test, args.seed)
        base = run_worker(args, "base", work)
        runs = {m: run_worker(args, m, work) for m in args.method_list}
    summary = {"base_exact_match": base.get("exact_match"),
               "methods": {m: {k: r.get(k) for k in ("exact_match", "trainable_pct", "minutes",
                                                      "peak_rss_mb")}
                           | ({"merge_max_diff": r["merge_max_diff"]}
                              if "merge_max_diff" in r else {})
                           | ({"error": r["error"]} if "error" in r else {})
                           for m, r in runs.items()}}
    result = {**summary, "base": base, "runs": runs,
              "settings": {k: getattr(args, k) for k in (
                  "minutes", "method_minutes", "n_train", "n_test", "epochs", "batch_size",
                  "grad_accum",
                  "seq_len", "lr", "set",
                  "seed", "model", "device")},
              "machine": machine_info(args.threads)}
    results = Path(args.results)
    write_json(result, results)
    budgets = {m: args.budget.get(m, args.minutes) for m in args.method_list}
    plot(summary, results.with_suffix(".png"), budgets)
    print_table(summary, runs)
    print(json.dumps(summary))


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(summary: dict[str, Any], runs: dict[str, dict[str, Any]]) -> None:
    print(f"{'method':<9} {'trainable %':>12} {'minutes':>8} {'peak RSS MB':>12} "
          f"{'exact-match':>12}")
    print(f"{'base':<9} {'-':>12} {'-':>8} {'-':>12} "
          f"{_fmt(summary['base_exact_match'], '.3f'):>12}")
    for method, row in summary["methods"].items():
        print(f"{method:<9} {_fmt(row['trainable_pct'], '.3f'):>12} "
              f"{_fmt(row['minutes'], '.1f'):>8} {_fmt(row['peak_rss_mb'], '.0f'):>12} "
              f"{_fmt(row['exact_match'], '.3f'):>12}"
              + (f"  ({row['error']})" if "error" in row else ""))
    for method, run in runs.items():
        if "merge_max_diff" in run:
            print(f"{method}: merged vs unmerged logits, max |diff| = {run['merge_max_diff']:.2e}")


def plot(summary: dict[str, Any], path: Path, budgets: dict[str, float]) -> None:
    plt = pyplot(path.name)
    if plt is None:
        return
    names = [f"{m}\n{budgets[m]:g} min" for m in summary["methods"]]
    scores = [row["exact_match"] or 0.0 for row in summary["methods"].values()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, scores, color="tab:blue")
    if summary["base_exact_match"] is not None:
        ax.axhline(summary["base_exact_match"], ls="--", color="gray", label="base model")
        ax.legend()
    ax.set(ylabel="held-out exact-match", ylim=(0, 1),
           title="SmolLM2-135M contract extraction (training budget under each bar)")
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    main()
