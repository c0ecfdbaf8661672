"""Peak memory of fine-tuning methods on SmolLM2-135M-Instruct, measured the same way for each:
one process per run, the same batches (4 rows of 512 packed tokens) for the same number of
steps, with glibc's default allocator and with `low_memory` (freed tensors returned to the OS
at once, so RSS follows the live tensors instead of what the allocator kept).

Full fine-tuning is the peer: the target is LoRA's peak below full fine-tuning's.

    python benchmarks/finetune_memory.py [--steps 3] [--methods full,lora,qlora]

Writes benchmarks/results/finetune_memory.json and .png; the last stdout line is one JSON
object with each run's peak RSS growth in MB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, pyplot, save_png, write_json  # noqa: E402
from finetune_task import write_task  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


def run(method: str, low_memory: bool, data: Path, out: Path, steps: int) -> dict:
    """One `pagoda finetune` process; its result.json."""
    command = [sys.executable, "-m", "pagoda.cli", "finetune", MODEL, str(data),
               "--method", method, "--max-steps", str(steps), "--seq-len", "512",
               "--batch-size", "4", "--val-fraction", "0", "--rank", "4", "--alpha", "8",
               "--out", str(out), "--json", "--set", "lora_dropout=0",
               "--set", f"low_memory={str(low_memory).lower()}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{method} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", default="full,lora,qlora")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data, _ = write_task(work / "task", 200, 10, 0)
        for low_memory in (False, True):
            for method in args.methods.split(","):
                result = run(method, low_memory, data, work / f"{method}-{low_memory}",
                             args.steps)
                runs.append({"method": method, "low_memory": low_memory,
                             "peak_rss_mb": round(result["peak_rss_mb"]),
                             "peak_rss_delta_mb": round(result["peak_rss_delta_mb"]),
                             "trainable_pct": result["trainable_pct"],
                             "s_per_step": round(60 * result["train_minutes"] / args.steps, 1)})
                print(runs[-1], flush=True)
    peak = {(r["method"], r["low_memory"]): r["peak_rss_delta_mb"] for r in runs}
    ratios = {f"{m} / full{' (low_memory)' if low else ''}": round(v / peak["full", low], 3)
              for (m, low), v in peak.items() if m != "full" and ("full", low) in peak}
    result = {"steps": args.steps, "runs": runs, "ratio_to_full": ratios,
              "lora_below_full": {str(low): peak.get(("lora", low), 0) < peak.get(("full", low), 0)
                                  for low in (False, True)},
              "machine": machine_info(0)}
    write_json(result, args.results / "finetune_memory.json")
    plot(runs, args.results / "finetune_memory.png")
    for r in runs:
        print(f"{r['method']:>6} {'low_memory' if r['low_memory'] else 'default':>10}: "
              f"+{r['peak_rss_delta_mb']:,} MB peak, {r['s_per_step']} s/step")
    print(json.dumps({f"{r['method']}{'-low' if r['low_memory'] else ''}": r["peak_rss_delta_mb"]
                      for r in runs}))


def plot(runs: list[dict], path: Path) -> None:
    plt = pyplot(path.name)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    for offset, low in ((-0.2, False), (0.2, True)):
        values = [next((r["peak_rss_delta_mb"] for r in runs
                        if r["method"] == m and r["low_memory"] == low), 0) for m in methods]
        ax.bar([i + offset for i in range(len(methods))], values, width=0.4,
               label="low_memory" if low else "default allocator")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("peak RSS growth while fine-tuning (MB)")
    ax.set_title("SmolLM2-135M-Instruct, 4 × 512 tokens per step")
    ax.legend()
    save_png(fig, path)


if __name__ == "__main__":
    main()
