"""GPT-2-124M-shaped pretraining on one CUDA GPU: model FLOPs utilisation of `pagoda pretrain`
(bf16 autocast, torch.compile, fused AdamW) next to Hugging Face transformers' GPT2LMHeadModel
trained with the same batch, optimizer, precision and compilation in the same run.

MFU = 6·N + 12·L·T·d FLOPs per token (pagoda.train.metrics) × tokens/s ÷ the GPU's dense bf16
peak (989 TFLOP/s on an H100 or H200). Targets: ≥ 40% (nanoGPT measured 37% on an A100, nanochat
41–46% on an H100). The first `--warmup` steps (compilation, allocator growth) are left out of the
medians. The data is the text given (default: tiny Shakespeare) through a BPE tokenizer trained
on it; the model keeps GPT-2's padded 50,304-token vocabulary, so the FLOPs are GPT-2's.

    python benchmarks/pretrain_gpu.py [--steps 50] [--batch-size 32] [--grad-accum 2]

Writes benchmarks/results/pretrain_gpu.json and .png (tokens/s per step, both models; `--results`
elsewhere); the last stdout line is one JSON object with mfu, tok_s and the ratio to the peer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, pyplot, save_png, write_json  # noqa: E402

from pagoda.data.loader import BatchLoader  # noqa: E402
from pagoda.data.shards import TokenShards  # noqa: E402
from pagoda.data.tokenize import tokenize_corpus  # noqa: E402
from pagoda.model.config import ModelConfig  # noqa: E402
from pagoda.model.transformer import Transformer  # noqa: E402
from pagoda.tokenizer.train import train_tokenizer  # noqa: E402
from pagoda.train import load_config, pretrain  # noqa: E402
from pagoda.train.metrics import flops_per_token, peak_flops  # noqa: E402
from pagoda.train.objectives import token_loss  # noqa: E402
from pagoda.train.optim import param_groups  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
CONFIG = ROOT / "configs" / "pretrain" / "gpt2-124m.yaml"
TARGET_MFU = 0.40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=TEXT, help="training text (tiny Shakespeare)")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per model")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the medians")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--data-vocab", type=int, default=8192, help="BPE trained on the text")
    parser.add_argument("--no-peer", action="store_true", help="skip Hugging Face's GPT-2")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("pretrain_gpu.py measures GPU utilisation and needs a CUDA GPU; on a CPU use "
                 "benchmarks/pretrain_shakespeare.py")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        train_tokenizer([args.text], args.data_vocab, work / "tok", held_out_fraction=0.0)
        tokenize_corpus([args.text], work / "tok", work / "shards", val_fraction=0.1)
        cfg = load_config(CONFIG, [f"data.shards={work / 'shards'}",
                                   f"train.out_dir={work / 'run'}",
                                   f"train.max_steps={args.steps}",
                                   f"data.batch_size={args.batch_size}",
                                   f"train.grad_accum={args.grad_accum}",
                                   "train.eval_every=0", "train.sample_every=0",
                                   "train.checkpoint_every=0", "train.progress=false"])
        torch.cuda.reset_peak_memory_stats()
        summary = pretrain(cfg)
        records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text()
                   .splitlines()]
        ours = {"steps": [r["tok_s"] for r in records],
                "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                "val_loss": summary["val_loss"], "final_loss": summary["loss"]}
        model_cfg = cfg.model_config(TokenShards.open(work / "shards", "train").vocab_size)
        peer = None if args.no_peer else hf_gpt2(args, model_cfg, work / "shards")
    tokens_per_step = args.batch_size * cfg.data.block_size * args.grad_accum
    with torch.device("meta"):
        flops = flops_per_token(Transformer(model_cfg), cfg.data.block_size)
    peak = peak_flops(torch.device("cuda"))
    result = {"gpu": torch.cuda.get_device_name(), "peak_flops": peak,
              "flops_per_token": flops, "tokens_per_step": tokens_per_step,
              "batch_size": args.batch_size, "grad_accum": args.grad_accum,
              "block_size": cfg.data.block_size, "steps": args.steps, "warmup": args.warmup,
              "target_mfu": TARGET_MFU, "machine": machine_info(torch.get_num_threads())}
    for name, run in (("pagoda", ours), ("transformers", peer)):
        if run is not None:
            tok_s = statistics.median(run["steps"][args.warmup:])
            result[name] = {**run, "tok_s": round(tok_s), "mfu": round(tok_s * flops / peak, 4)}
    if peer is not None:
        result["ratio_to_peer"] = round(result["pagoda"]["tok_s"] /
                                        result["transformers"]["tok_s"], 3)
    result["reached_target"] = result["pagoda"]["mfu"] >= TARGET_MFU
    write_json(result, args.results / "pretrain_gpu.json")
    plot(result, args.results / "pretrain_gpu.png")
    for name in ("pagoda", "transformers"):
        if name in result:
            r = result[name]
            print(f"{name:>12}: {r['tok_s']:,} tokens/s, MFU {100 * r['mfu']:.1f}%, "
                  f"peak {r['peak_gb']:.1f} GB")
    print(json.dumps({"mfu": result["pagoda"]["mfu"], "tok_s": result["pagoda"]["tok_s"],
                      "ratio_to_peer": result.get("ratio_to_peer")}))


def hf_gpt2(args: argparse.Namespace, cfg: ModelConfig, shards: Path) -> dict:
    """Hugging Face's GPT2LMHeadModel (SDPA attention) through the same step as the trainer's:
    bf16 autocast, compiled, fp32 loss, fused AdamW over the same decay groups, clipping."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len,
                        n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        n_inner=cfg.d_ff, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa").cuda().train()
    forward = torch.compile(model)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95),
                                  fused=True)
    loader = BatchLoader(TokenShards.open(shards, "train"), 1024, args.batch_size, seed=0)
    torch.cuda.reset_peak_memory_stats()
    steps, loss = [], None
    for _ in range(args.steps):
        tick = time.perf_counter()
        for _ in range(args.grad_accum):
            x, y = (b.cuda(non_blocking=True) for b in loader.next())
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = token_loss(forward(x).logits, y)
            (loss / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the GPU, as the trainer's step does
        steps.append(args.batch_size * 1024 * args.grad_accum / (time.perf_counter() - tick))
    return {"steps": steps, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
            "final_loss": loss.item()}


def plot(result: dict, path: Path) -> None:
    plt = pyplot(path.name)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in ("pagoda", "transformers"):
        if name in result:
            r = result[name]
            ax.plot(range(1, len(r["steps"]) + 1), [t / 1e3 for t in r["steps"]],
                    label=f"{name}: MFU {100 * r['mfu']:.1f}%")
    ax.axvline(result["warmup"] + 0.5, color="grey", linestyle=":", label="measured from here")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("thousand tokens / s")
    ax.set_title(f"GPT-2 124M, bf16, compiled, on {result['gpu']}")
    ax.legend()
    save_png(fig, path)


if __name__ == "__main__":
    main()
