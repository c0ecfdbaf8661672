"""Prefill and decode speed of Pagoda vs Hugging Face `transformers` on SmolLM2-135M-Instruct.

Both peers load the same GGUF file (fp32, CPU, batch 1, same thread count), get the same
prompts (real text from tinyshakespeare, tokenized by Pagoda's tokenizer) and generate the same
number of greedy tokens with EOS ignored. Each is measured the same way:

    prefill s   = wall time of a 1-token generation (prefill + first sample)
    full s      = wall time of an N-token generation
    prefill tok/s = prompt_len / prefill s
    decode tok/s  = (N - 1) / (full s - prefill s)

using the median (`--stat min` for a busy machine) over `--repeats` of each time, after one
warm-up run per peer and prompt length. Peers are interleaved (and alternate who goes first)
so machine-load drift hits both.

    .venv/bin/python benchmarks/decode.py            # 128 and 512-token prompts, 64 new tokens
    .venv/bin/python benchmarks/decode.py --quick    # smoke test: 32-token prompt, 16 tokens

Writes benchmarks/results/decode.json and decode.png; the last stdout line is one JSON object.
Targets (pagoda/transformers ratio: decode >= 2.0, prefill >= 1.0) are reported, not asserted.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import machine_info, pyplot, save_png, write_json

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/data/tinyshakespeare/input.txt"
RESULTS = REPO / "benchmarks" / "results"
MODEL = "smollm2-135m-instruct"
PEERS = ("pagoda", "transformers")
TARGETS = {"decode_ratio": 2.0, "prefill_ratio": 1.0}  # pagoda / transformers, at least
HEADLINE_LEN = 128  # prompt length the top-level figures of the JSON line describe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --quick fills in small values for anything not given."""
    p = argparse.ArgumentParser(
        description="Prefill/decode tokens/s of Pagoda vs transformers generate() on "
        "SmolLM2-135M-Instruct (fp32, CPU, batch 1).",
        epilog="example: .venv/bin/python benchmarks/decode.py --prompt-lens 128,512 "
        "--new-tokens 64 --repeats 3",
    )
    p.add_argument("--prompt-lens", default=None, help="comma-separated prompt lengths "
                   "in tokens (default 128,512; --quick: 32)")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="greedy tokens to generate (default 64; --quick: 16)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per peer and length (default 3; --quick: 1)")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="how repeats combine (default median; min resists a busy machine)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for both peers (2)")
    p.add_argument("--quick", action="store_true", help="smoke test: small sizes, one repeat")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for decode.json/decode.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    args = p.parse_args(argv)
    quick = args.quick
    args.prompt_lens = args.prompt_lens or ("32" if quick else "128,512")
    args.new_tokens = args.new_tokens or (16 if quick else 64)
    args.repeats = args.repeats or (1 if quick else 3)
    try:
        args.prompt_lens = [int(x) for x in str(args.prompt_lens).split(",") if x.strip()]
    except ValueError:
        p.error(f"--prompt-lens must be comma-separated integers, got {args.prompt_lens!r}")
    if not args.prompt_lens or min(args.prompt_lens) < 1:
        p.error("--prompt-lens needs at least one length >= 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode speed needs tokens after the first)")
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    return args


# ------------------------------------------------------------------------------ peers
class PagodaPeer:
    """Pagoda's engine (`pagoda.infer.engine.generate`, what the CLI runs) on the loaded model."""

    name = "pagoda"

    def __init__(self, loaded) -> None:
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.last_timings = None

    def generate(self, prompt: list[int], n: int) -> list[int]:
        """Greedy, EOS ignored; returns the n new token ids."""
        from pagoda.infer.engine import generate
        from pagoda.infer.generate import Timings
        from pagoda.infer.sampling import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        timings = Timings()
        out: list[int] = []
        for events in generate(self.model, [prompt], [params],
                               eos_ids=self.tokenizer.eos_ids, timings=timings):
            out.extend(e.token_id for e in events)
        self.last_timings = timings
        return out


class TransformersPeer:
    """Hugging Face `AutoModelForCausalLM.generate()` on the same GGUF file."""

    name = "transformers"

    def __init__(self, gguf: Path, dtype) -> None:
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.logging.set_verbosity_error()
        self.model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=dtype
        ).eval()
        cfg = self.model.generation_config
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
        if isinstance(self.pad_id, list):
            self.pad_id = self.pad_id[0]

    def generate(self, prompt: list[int], n: int) -> list[int]:
        """Greedy, EOS suppressed by min_new_tokens; returns the n new token ids."""
        import torch

        ids = torch.tensor([prompt])
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=n, min_new_tokens=n, pad_token_id=self.pad_id,
        )
        return out[0, len(prompt):].tolist()


def timed(peer, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """Wall seconds of one generation of n tokens, and its tokens."""
    start = time.perf_counter()
    tokens = peer.generate(prompt, n)
    elapsed = time.perf_counter() - start
    if len(tokens) != n:
        raise RuntimeError(f"{peer.name} generated {len(tokens)} tokens, expected {n}")
    return elapsed, tokens


# ------------------------------------------------------------------------------ inputs
def load_prompt_tokens(tokenizer, longest: int) -> list[int]:
    """At least `longest` token ids of real text from tinyshakespeare."""
    text = DATA.read_text(encoding="utf-8")
    chars = 8 * longest + 1024
    while True:
        ids = tokenizer.encode(text[:chars])
        if len(ids) > longest or chars >= len(text):
            break
        chars *= 2
    if len(ids) < longest:
        raise SystemExit(f"error: {DATA} has only {len(ids)} tokens, need {longest}")
    return ids[:longest]


def run(args: argparse.Namespace) -> dict:
    """Load both peers, time them interleaved, return the results object."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    load_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)  # before loading, for both peers

    from pagoda.hub.loader import load_model

    with err.status(f"loading {MODEL} (Pagoda)"):
        loaded = load_model(MODEL, device="cpu", dtype="fp32")
    with err.status(f"loading {loaded.path.name} (transformers)"):
        hf = TransformersPeer(loaded.path, torch.float32)
    peers = {"pagoda": PagodaPeer(loaded), "transformers": hf}
    if torch.get_num_threads() != args.threads:  # a library changed it while loading
        torch.set_num_threads(args.threads)

    base = load_prompt_tokens(loaded.tokenizer, max(args.prompt_lens))
    n = args.new_tokens
    # times[peer][L] = {"prefill": [...], "full": [...]}
    times = {p: {L: {"prefill": [], "full": []} for L in args.prompt_lens} for p in PEERS}
    outputs: dict[str, dict[int, list[int]]] = {p: {} for p in PEERS}
    internal: dict[int, list[dict]] = {L: [] for L in args.prompt_lens}  # Pagoda's own Timings

    steps = len(args.prompt_lens) * len(PEERS) * (1 + args.repeats)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task("benchmark", total=steps)
        for L in args.prompt_lens:
            prompt = base[:L]
            for rep in range(1 + args.repeats):  # rep 0 is the warm-up
                order = PEERS if rep % 2 == 0 else PEERS[::-1]
                for name in order:
                    label = "warm-up" if rep == 0 else f"run {rep}/{args.repeats}"
                    progress.update(task, description=f"{name:<12} len {L:<4} {label}")
                    peer = peers[name]
                    t_pre, _ = timed(peer, prompt, 1)
                    t_full, tokens = timed(peer, prompt, n)
                    if rep > 0:
                        times[name][L]["prefill"].append(t_pre)
                        times[name][L]["full"].append(t_full)
                        if name == "pagoda":
                            internal[L].append(peer.last_timings.to_dict())
                    outputs[name][L] = tokens
                    progress.advance(task)

    import transformers

    machine = machine_info(args.threads)
    machine["transformers"] = transformers.__version__
    # 1-minute load average before and after: other work on the machine makes numbers noisy
    machine["load_avg_1m"] = {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}
    return summarize(args, times, outputs, internal, machine,
                     {"attn_implementation": getattr(hf.model.config, "_attn_implementation",
                                                     None), "gguf": loaded.path.name})


def summarize(args, times, outputs, internal, machine, extra) -> dict:
    """Medians, rates, ratios and targets per prompt length, plus the headline length."""
    n = args.new_tokens
    per_len = {}
    for L in args.prompt_lens:
        row = {}
        for p in PEERS:
            combine = statistics.median if args.stat == "median" else min
            pre, full = combine(times[p][L]["prefill"]), combine(times[p][L]["full"])
            best_pre, best_full = min(times[p][L]["prefill"]), min(times[p][L]["full"])
            row[p] = {
                "prefill_s": round(pre, 5),
                "full_s": round(full, 5),
                "prefill_tok_s": round(L / pre, 2),
                "decode_tok_s": _decode_rate(n, full, pre),  # None if full <= prefill (noise)
                "best_prefill_tok_s": round(L / best_pre, 2),  # from the fastest runs
                "best_decode_tok_s": _decode_rate(n, best_full, best_pre),
                "prefill_runs_s": [round(t, 5) for t in times[p][L]["prefill"]],
                "full_runs_s": [round(t, 5) for t in times[p][L]["full"]],
            }
        a, b = row["pagoda"], row["transformers"]
        row["decode_ratio"] = (round(a["decode_tok_s"] / b["decode_tok_s"], 3)
                               if a["decode_tok_s"] and b["decode_tok_s"] else None)
        row["prefill_ratio"] = round(a["prefill_tok_s"] / b["prefill_tok_s"], 3)
        row["targets"] = {k: _verdict(row[k], v) for k, v in TARGETS.items()}
        ours, theirs = outputs["pagoda"][L], outputs["transformers"][L]
        same = next((i for i, (x, y) in enumerate(zip(ours, theirs, strict=True)) if x != y), len(ours))
        row["greedy_tokens_agree"] = same  # leading generated tokens identical in both peers
        row["pagoda_internal_timings"] = internal[L]
        per_len[str(L)] = row

    head = HEADLINE_LEN if HEADLINE_LEN in args.prompt_lens else args.prompt_lens[0]
    h = per_len[str(head)]
    return {
        "benchmark": "decode",
        "model": MODEL,
        "dtype": "fp32",
        "batch": 1,
        "prompt_len": head,
        "new_tokens": n,
        "decode_tok_s": {p: h[p]["decode_tok_s"] for p in PEERS},
        "prefill_tok_s": {p: h[p]["prefill_tok_s"] for p in PEERS},
        "decode_ratio": h["decode_ratio"],
        "prefill_ratio": h["prefill_ratio"],
        "targets": {k: {"min": v, "pass": h["targets"][k] == "PASS"} for k, v in TARGETS.items()},
        "repeats": args.repeats,
        "stat": args.stat,
        "quick": args.quick,
        "method": f"prefill = {args.stat} time of a 1-token generation; decode tok/s = "
                  f"(new_tokens - 1) / ({args.stat} full time - {args.stat} prefill time); "
                  "1 warm-up per peer and length; peers interleaved; best_* use the min times",
        "by_prompt_len": per_len,
        "machine": machine,
        **extra,
    }


def _decode_rate(n: int, full_s: float, prefill_s: float) -> float | None:
    """Tokens/s of the n - 1 tokens after the first; None when timing noise makes it <= 0."""
    return round((n - 1) / (full_s - prefill_s), 2) if full_s > prefill_s else None


def _verdict(value: float | None, minimum: float) -> str:
    return "PASS" if value is not None and value >= minimum else "FAIL"


# ------------------------------------------------------------------------------ output
def print_tables(result: dict) -> None:
    """Rich tables of speeds, ratios and targets on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    m = result["machine"]
    speeds = Table(title=f"{result['model']} fp32, batch 1, {m['threads']} threads, "
                         f"{result['new_tokens']} new tokens, {result['stat']} of {result['repeats']}")
    for col in ("peer", "prompt len", "prefill tok/s", "decode tok/s"):
        speeds.add_column(col, justify="left" if col == "peer" else "right")
    for L, row in result["by_prompt_len"].items():
        for p in PEERS:
            d = row[p]["decode_tok_s"]
            speeds.add_row(p, L, f"{row[p]['prefill_tok_s']:.1f}",
                           "n/a" if d is None else f"{d:.1f}")
    console.print(speeds)

    ratios = Table(title="pagoda / transformers")
    for col in ("prompt len", "prefill ratio", "target", "", "decode ratio", "target ", " "):
        ratios.add_column(col, justify="right")
    for L, row in result["by_prompt_len"].items():
        cells = []
        for k in ("prefill_ratio", "decode_ratio"):
            v, verdict = row[k], row["targets"][k]
            colour = "green" if verdict == "PASS" else "red"
            cells += ["n/a" if v is None else f"{v:.2f}x", f">= {TARGETS[k]:.1f}",
                      f"[{colour}]{verdict}[/{colour}]"]
        ratios.add_row(L, *cells)
    console.print(ratios)
    console.print(f"[dim]{m['cpu']} · {m['cores']} cores · torch {m['torch']} · "
                  f"transformers {m['transformers']} · {m['date']}[/dim]")


def plot(result: dict, folder: Path) -> Path | None:
    """Grouped bar chart decode.png (prefill and decode tok/s per prompt length)."""
    plt = pyplot("decode.png")
    if plt is None:
        return None
    lens = list(result["by_prompt_len"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    width = 0.38
    for ax, metric, ratio_key in ((axes[0], "prefill_tok_s", "prefill_ratio"),
                                  (axes[1], "decode_tok_s", "decode_ratio")):
        for j, (p, colour) in enumerate(zip(PEERS, ("#c0392b", "#7f8c8d"), strict=True)):
            xs = [i + (j - 0.5) * width for i in range(len(lens))]
            ys = [result["by_prompt_len"][L][p][metric] or 0 for L in lens]
            bars = ax.bar(xs, ys, width, label=p, color=colour)
            ax.bar_label(bars, labels=[f"{y:.0f}" if y >= 10 else f"{y:.1f}" for y in ys],
                         fontsize=8)
        for i, L in enumerate(lens):
            r = result["by_prompt_len"][L][ratio_key]
            if r is not None:
                ax.annotate(f"{r:.2f}x", (i, 0), xytext=(0, -28), textcoords="offset points",
                            ha="center", fontsize=9, weight="bold")
        ax.set_xticks(range(len(lens)), [f"prompt {L}" for L in lens])
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{metric.split('_')[0]} (target ratio >= {TARGETS[ratio_key]:.1f}x)")
        ax.margins(y=0.15)
    axes[0].legend()
    m = result["machine"]
    fig.suptitle(f"{result['model']} fp32 CPU batch 1, {m['threads']} threads, "
                 f"{result['new_tokens']} new tokens, {result['stat']} of {result['repeats']} — "
                 f"{m['cpu']}, {m['date'][:10]}", fontsize=10)
    fig.tight_layout()
    path = save_png(fig, folder / "decode.png")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print tables, write JSON and PNG, end with one JSON line."""
    args = parse_args(argv)
    if not DATA.is_file():
        raise SystemExit(f"error: prompt text not found at {DATA} (expected tinyshakespeare "
                         "input.txt in the shared data folder next to the repository)")
    result = run(args)
    print_tables(result)
    json_path = write_json(result, args.out / "decode.json")
    png_path = None if args.no_plot else plot(result, args.out)
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""), file=sys.stderr)
    headline = copy.deepcopy({k: v for k, v in result.items() if k not in ("machine", "method")})
    headline["machine"] = {k: result["machine"][k] for k in ("cpu", "cores", "threads", "torch",
                                                             "date")}
    for row in headline["by_prompt_len"].values():  # keep the last line compact
        row.pop("pagoda_internal_timings", None)
        for p in PEERS:
            row[p].pop("prefill_runs_s", None)
            row[p].pop("full_runs_s", None)
            row[p].pop("prefill_s", None)
            row[p].pop("full_s", None)
    sys.stdout.flush()
    print(json.dumps(headline, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
