"""Supervised fine-tuning: one loop, and the method is a config choice.

    method   what trains                                         default lr (source)
    full     every weight                                        2e-5 (Alpaca, LLaMA-Factory)
    freeze   the top blocks; embeddings + bottom N frozen        5e-5
    lora     low-rank adapters on the projections                2e-4 (QLoRA paper, PEFT)
    qlora    LoRA over an int4/int8-quantized frozen base        2e-4 (QLoRA paper)
    prompt   n virtual input embeddings (Lester et al.)          3e-2 (PEFT's prompt tuning)
    ptuning  per-layer prefix keys/values (P-Tuning v2)          1e-2 (P-Tuning v2, PEFT)

`finetune(model, tokenizer, data, cfg)` reads chat data (`sft_data`: OpenAI, ShareGPT or Alpaca
records), trains only on assistant tokens with AdamW over the trainable parameters, a cosine
schedule with warmup, accumulation and clipping, evaluates on a held-out split, logs
metrics.jsonl + loss.png, and saves into `out_dir` what the method made: a model folder that
`pagoda chat OUT_DIR` loads (full, freeze), a PEFT adapter (lora, qlora; `merge` adds a merged
model in OUT_DIR/merged) or PEFT prompt files (prompt, ptuning), plus result.json.

With a time budget (`max_minutes`) the schedule runs on whichever is further along, steps or
time, so a run cut by the clock still ends its cosine decay instead of stopping at a high LR.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import resource
import shutil
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from pagoda.configfile import check, from_text
from pagoda.errors import ConfigError
from pagoda.model.device import pick_device
from pagoda.model.hf_checkpoint import atomic_json, save_hf_checkpoint
from pagoda.model.lora import DEFAULT_TARGETS, LoraConfig, add_lora, merge_and_unload, save_adapter
from pagoda.model.quantized import QuantizedLinear, quantize_linears
from pagoda.model.transformer import Transformer
from pagoda.tokenizer import Tokenizer
from pagoda.train.config import OptimConfig
from pagoda.train.metrics import MetricsLog, plot_losses
from pagoda.train.optim import build_optimizer, set_learning_rate
from pagoda.train.prompt_tuning import (
    PromptTunedModel,
    VirtualTokens,
    build_virtual_tokens,
    count_parameters,
    save_virtual_tokens,
)
from pagoda.train.sft_data import (
    EncodeReport,
    SftBatch,
    SftExample,
    encode_with_report,
    read_conversations,
    sft_batches,
    sft_loss,
    split_examples,
)

Method = Literal["full", "freeze", "lora", "qlora", "prompt", "ptuning"]
METHODS: tuple[str, ...] = ("full", "freeze", "lora", "qlora", "prompt", "ptuning")
DEFAULT_LR = {"full": 2e-5, "freeze": 5e-5, "lora": 2e-4, "qlora": 2e-4, "prompt": 3e-2,
              "ptuning": 1e-2}
RESULT = "result.json"
# Files a run writes into out_dir; a new run removes them first so no stale artifact of another
# method is left next to the new one (a loader would read it).
ARTIFACTS = ("config.json", "pagoda_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "adapter_config.json", "adapter_model.safetensors",
             "merged", RESULT, "metrics.jsonl", "loss.png")


@dataclass
class FinetuneConfig:
    """One fine-tuning run; every field can be set with `pagoda finetune --set key=value`."""

    method: Method = "lora"
    lr: float | None = None  # peak learning rate; None: the method's default (DEFAULT_LR)
    epochs: float = 3.0  # passes over the training split (fractions allowed)
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    max_minutes: float = 0.0  # wall-clock budget for training; 0: none
    batch_size: int = 4  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 1024  # tokens per row; longer conversations are truncated
    pack: bool = True  # several whole examples per row (each attends only to itself)
    val_fraction: float = 0.05  # share of examples held out for validation; 0: none
    eval_every: int = 0  # steps between validation passes (also before and after); 0: ends only
    eval_batches: int = 0  # validation batches per pass; 0: all of them
    warmup_ratio: float = 0.03  # share of the steps spent warming the LR up
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0
    freeze_layers: int = -2  # freeze: bottom N blocks frozen (negative: all but the top |N|)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    qlora_bits: int = 4  # 4 or 8: the frozen base's weight storage
    qlora_group_size: int = 64  # inputs per quantization scale
    num_virtual_tokens: int = 20  # prompt / ptuning
    prompt_init_text: str = ""  # init virtual tokens from this text ("" samples the vocabulary)
    prefix_projection: int = 0  # ptuning: hidden width of the reparameterisation MLP; 0: none
    merge: bool = False  # lora/qlora: also save the merged model in out_dir/merged
    # Recompute each block's activations in backward instead of storing them: much less memory
    # for a third more compute. full/freeze/lora/qlora only (prompt methods run through a cache).
    activation_checkpointing: bool = False
    # CPU (glibc): give freed tensors back to the OS at once, so peak memory is what the method
    # needs, not what the allocator kept (LoRA on SmolLM2: 3.4 GB, not 6.9 GB); ~1.6x slower
    low_memory: bool = False
    out_dir: str = "runs/finetune"
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: Literal["float32", "bfloat16"] = "float32"  # autocast dtype (weights stay fp32)
    progress: bool = True  # a progress bar on stderr

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def validate(self) -> None:
        """Reject impossible values with one line naming the field."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, "
                                     f"got {self.method!r}")
        for key in ("batch_size", "grad_accum", "seq_len", "lora_r", "num_virtual_tokens",
                    "qlora_group_size"):
            need(getattr(self, key) > 0, f"{key} must be positive, got {getattr(self, key)}")
        for key in ("max_steps", "max_minutes", "eval_every", "eval_batches", "weight_decay",
                    "grad_clip", "prefix_projection"):
            need(getattr(self, key) >= 0, f"{key} must be 0 or more, got {getattr(self, key)}")
        need(self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.epochs > 0 or self.max_steps > 0, "set epochs > 0 or max_steps > 0")
        need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.qlora_bits in (4, 8), f"qlora_bits must be 4 or 8, got {self.qlora_bits}")
        need(not self.merge or self.method in ("lora", "qlora"),
             f"merge applies to lora and qlora, not {self.method}")

    def check_out_dir(self, base_model: str) -> None:
        """Refuse to write into the base model's folder (the run clears its artifacts)."""
        if base_model and Path(base_model).exists() and \
                Path(base_model).resolve() == Path(self.out_dir).resolve():
            raise ConfigError(f"out_dir {self.out_dir} is the base model's folder; choose "
                              "another --out")

    def with_overrides(self, items: list[str]) -> FinetuneConfig:
        """A copy with `key=value` overrides (values typed by the field, as in `--set`)."""
        types = typing.get_type_hints(FinetuneConfig)
        values = {}
        for item in items:
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"override {item!r} must look like key=value, e.g. lr=1e-4")
            if key not in types:
                raise ConfigError(f"unknown key {key} (allowed: {', '.join(types)})")
            values[key] = check(from_text(text.strip(), types[key]), types[key], key)
        return dataclasses.replace(self, **values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ methods
@dataclass
class Setup:
    """What a method prepared: the module sft_loss calls, and how to save the result."""

    forward: nn.Module  # called as forward(ids, positions=, segments=) -> logits
    tokens: VirtualTokens | None = None  # prompt / ptuning
    notes: dict[str, Any] = field(default_factory=dict)


def _freeze(model: Transformer, freeze_layers: int) -> dict[str, Any]:
    """Embeddings and the bottom blocks frozen, the rest (top blocks, final norm, an untied
    head) trained; returns which blocks train."""
    n = model.cfg.n_layer
    frozen = freeze_layers if freeze_layers >= 0 else n + freeze_layers
    if not 0 <= frozen < n:
        raise ConfigError(f"freeze_layers={freeze_layers} leaves no block of {n} to train "
                          f"(use 0..{n - 1}, or -1..-{n} for the top blocks)")
    model.requires_grad_(True)
    for module in (model.embed, model.pos_embed, model.type_embed, model.embed_norm,
                   *model.layers[:frozen]):
        if module is not None:
            module.requires_grad_(False)
    return {"trained_blocks": list(range(frozen, n))}


def setup_method(model: Transformer, tokenizer: Tokenizer, cfg: FinetuneConfig) -> Setup:
    """Make exactly the method's parameters trainable (changing the model in place)."""
    method = cfg.method
    if method == "full":
        model.requires_grad_(True)
        return Setup(model)
    if method == "freeze":
        return Setup(model, notes=_freeze(model, cfg.freeze_layers))
    if method in ("lora", "qlora"):
        notes: dict[str, Any] = {}
        if method == "qlora":  # quantize the frozen base first, then adapters on top
            model.requires_grad_(False)
            notes["quantized"] = len(quantize_linears(model, cfg.qlora_bits,
                                                      cfg.qlora_group_size))
        lora = LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_targets)
        notes["adapted"] = len(add_lora(model, lora))
        return Setup(model, notes=notes)
    model.requires_grad_(False)
    tokens = build_virtual_tokens(model, method, cfg.num_virtual_tokens, tokenizer,
                                  cfg.prompt_init_text or None, cfg.prefix_projection, cfg.seed)
    return Setup(PromptTunedModel(model, tokens), tokens=tokens)


# ------------------------------------------------------------------ helpers
def lr_at(step: int, progress: float, cfg: FinetuneConfig, warmup_steps: int) -> float:
    """Linear warmup over the first steps, then cosine over `progress` (0..1) to min_lr."""
    peak = cfg.peak_lr
    warm = min(1.0, (step + 1) / (warmup_steps + 1))
    low = peak * cfg.min_lr_ratio
    return warm * (low + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (peak - low))


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 128 KiB for this process. Its default threshold grows to the
    largest block ever freed, after which big tensors come from the heap, whose freed holes the
    process keeps: on CPU, training RSS then climbs step after step with fragmentation (more
    for LoRA's mix of tiny and large tensors). With a fixed threshold every large tensor is its
    own mapping, returned when freed. False where there is no glibc (macOS, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_MMAP_THRESHOLD = -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB (ru_maxrss is KB on Linux)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _clear_artifacts(out: Path) -> None:
    for name in ARTIFACTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def dequantize_linears(model: nn.Module) -> None:
    """QuantizedLinear -> plain Linear with the dequantized weight (to merge QLoRA into)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            model.set_submodule(name, module.to_linear())


@torch.no_grad()
def evaluate(forward: nn.Module, batches: list[SftBatch], device: torch.device,
             autocast: Any) -> float:
    """Mean validation loss, weighted by each batch's trained tokens."""
    was_training = forward.training
    forward.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        n = batch.trained_tokens
        if not n:
            continue
        with autocast():
            total += sft_loss(forward, batch.to(device)).item() * n
        tokens += n
    forward.train(was_training)
    return total / tokens if tokens else float("nan")


# ------------------------------------------------------------------ the loop
def _prepare_data(tokenizer: Tokenizer, data_path: str | Path, cfg: FinetuneConfig
                  ) -> tuple[list[SftExample], list[SftExample], list[SftBatch], EncodeReport]:
    """(train examples, val examples, the fixed val batches, what encoding did)."""
    examples, report = encode_with_report(tokenizer, read_conversations(data_path), cfg.seq_len)
    train_set, val_set = split_examples(examples, cfg.val_fraction, cfg.seed)
    val_batches = (sft_batches(val_set, cfg.seq_len, cfg.batch_size, cfg.pack, cfg.seed)
                   if val_set else [])
    return train_set, val_set, val_batches[:cfg.eval_batches or None], report


def finetune(model: Transformer, tokenizer: Tokenizer, data_path: str | Path,
             cfg: FinetuneConfig, base_model: str = "") -> dict[str, Any]:
    """Fine-tune `model` (changed in place) on a chat file; returns what result.json holds."""
    cfg.validate()
    cfg.check_out_dir(base_model)
    started = time.perf_counter()
    device = pick_device(cfg.device)
    if cfg.low_memory and device.type == "cpu":
        return_freed_memory()
    rss_before = peak_rss_mb()
    if cfg.dtype == "bfloat16" and device.type == "cpu":
        raise ConfigError("dtype bfloat16 is for GPUs; on CPU fine-tune in float32")
    model.to(device).train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    P = cfg.num_virtual_tokens if cfg.method in ("prompt", "ptuning") else 0
    if cfg.seq_len + P > model.cfg.max_seq_len:
        raise ConfigError(f"seq_len {cfg.seq_len}{f' + {P} virtual tokens' if P else ''} exceeds "
                          f"the model's context of {model.cfg.max_seq_len}; lower seq_len")
    if not model.cfg.causal or not model.cfg.lm_head:
        raise ConfigError(f"model '{model.cfg.name}' is not a causal language model")

    train_set, val_set, val_batches, report = _prepare_data(tokenizer, data_path, cfg)
    epoch_batches = sft_batches(train_set, cfg.seq_len, cfg.batch_size, cfg.pack, cfg.seed)
    steps_per_epoch = max(1, len(epoch_batches) // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = round(cfg.warmup_ratio * total_steps)

    base_params = count_parameters(model)[1]
    setup = setup_method(model, tokenizer, cfg)
    forward = setup.forward.to(device).train()
    model.checkpoint_blocks = cfg.activation_checkpointing and setup.tokens is None
    trainable = count_parameters(forward)[0]
    added = trainable if cfg.method not in ("full", "freeze") else 0
    if not trainable:
        raise ConfigError(f"method {cfg.method} left nothing to train")
    params = [p for p in forward.parameters() if p.requires_grad]
    optimizer = build_optimizer(forward, OptimConfig(lr=cfg.peak_lr, betas=(0.9, 0.999),
                                                     weight_decay=cfg.weight_decay))
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None

    def autocast():
        return (torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext())

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_artifacts(out)  # never the base model's folder: see check_out_dir
    log = MetricsLog(out / "metrics.jsonl")
    say = (lambda text: tqdm.write(text, file=sys.stderr)) if cfg.progress else (lambda _: None)
    say(f"{cfg.method}: {report}; {len(train_set)} train / {len(val_set)} val examples, "
        f"{total_steps} steps; trainable {trainable:,} of {base_params + added:,} parameters "
        f"({100 * trainable / (base_params + added):.3f}%)")
    val_before = evaluate(forward, val_batches, device, autocast) if val_batches else None
    if val_before is not None:
        log.write({"step": 0, "val_loss": val_before})

    budget = cfg.max_minutes * 60
    train_start = time.perf_counter()
    bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, disable=not cfg.progress,
               file=sys.stderr)
    losses: list[float] = []
    step, epoch, cursor, tokens_trained = 0, 0, 0, 0
    stopped = "max_steps" if cfg.max_steps else "epochs"
    val_loss = val_before
    while step < total_steps:
        elapsed = time.perf_counter() - train_start
        if budget and elapsed >= budget:
            stopped = "time"
            break
        progress = max(step / total_steps, elapsed / budget if budget else 0.0)
        lr = lr_at(step, progress, cfg, warmup_steps)
        set_learning_rate(optimizer, lr)
        total = 0.0
        for _ in range(cfg.grad_accum):
            if cursor == len(epoch_batches):  # next epoch, reshuffled
                epoch, cursor = epoch + 1, 0
                epoch_batches = sft_batches(train_set, cfg.seq_len, cfg.batch_size, cfg.pack,
                                            cfg.seed + epoch)
            batch = epoch_batches[cursor].to(device)
            cursor += 1
            with autocast():
                loss = sft_loss(forward, batch)
                if model.cfg.n_experts:
                    loss = loss + model.cfg.moe_aux_loss_coef * model.aux_loss
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            tokens_trained += batch.trained_tokens
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(total)
        record = {"step": step, "loss": total, "lr": lr, "grad_norm": norm.item(),
                  "epoch": epoch + cursor / len(epoch_batches),
                  "elapsed_s": time.perf_counter() - train_start}
        if val_batches and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            val_loss = record["val_loss"] = evaluate(forward, val_batches, device, autocast)
            say(f"step {step}: val loss {val_loss:.4f}")
        log.write(record)
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}")
        bar.update()
    bar.close()
    if val_batches:
        val_loss = evaluate(forward, val_batches, device, autocast)
        log.write({"step": step, "val_loss": val_loss})
    train_minutes = (time.perf_counter() - train_start) / 60

    artifact, merged = _save(model, tokenizer, setup, cfg, out, base_model)
    plot = plot_losses(log.records(), out / "loss.png", title=f"{cfg.method} fine-tuning")
    peak = peak_rss_mb()
    tail = losses[-max(1, min(10, len(losses))):]
    result = {
        "method": cfg.method, "base_model": base_model, "trainable": trainable,
        "total": base_params + added, "trainable_pct": 100 * trainable / (base_params + added),
        "steps": step, "epochs": epoch + cursor / len(epoch_batches), "stopped": stopped,
        "lr": cfg.peak_lr, "first_loss": losses[0] if losses else None,
        "train_loss": sum(tail) / len(tail) if losses else None,
        "val_loss_before": val_before, "val_loss": val_loss, "tokens_trained": tokens_trained,
        "train_minutes": train_minutes, "minutes": (time.perf_counter() - started) / 60,
        "peak_rss_mb": peak, "peak_rss_delta_mb": peak - rss_before,
        "gpu_peak_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                        if device.type == "cuda" else None),
        "examples": {"train": len(train_set), "val": len(val_set), "truncated": report.truncated,
                     "skipped": report.skipped},
        "device": str(device), "out_dir": str(out), "artifact": str(artifact),
        "merged": str(merged) if merged else None, "loss_png": str(plot) if plot else None,
        **setup.notes, "config": cfg.to_dict(),
    }
    atomic_json(out / RESULT, result)
    return result


def _save(model: Transformer, tokenizer: Tokenizer, setup: Setup, cfg: FinetuneConfig,
          out: Path, base_model: str) -> tuple[Path, Path | None]:
    """Write the method's artifact into `out`; returns (artifact, merged model folder or None)."""
    model.eval()
    model.checkpoint_blocks = False
    if cfg.method in ("full", "freeze"):
        save_hf_checkpoint(model, out)
        tokenizer.save(out)
        return out, None
    if setup.tokens is not None:
        return save_virtual_tokens(setup.tokens, model, out, base_model), None
    save_adapter(model, out, "default", base_model)
    if not cfg.merge:
        return out, None
    dequantize_linears(model)  # qlora merges into the dequantized base, as the QLoRA authors do
    merged = merge_and_unload(model)
    save_hf_checkpoint(merged, out / "merged")
    tokenizer.save(out / "merged")
    return out, out / "merged"
