"""`PretrainConfig`: one YAML file (plus `--set section.key=value` overrides) describes a run.

Each section is a dataclass whose fields document the knob where it is defined;
`pagoda.configfile` checks every key and type against them when the file is read.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pagoda.configfile import (
    apply_overrides,
    build_section,
    check,
    check_sections,
    field_type,
    read_yaml,
)
from pagoda.errors import ConfigError
from pagoda.model.config import ModelConfig


@dataclass
class DataConfig:
    """Where the tokens come from and how they are cut into batches."""

    shards: str = ""  # a folder written by `pagoda data tokenize` (index.json + .bin files)
    block_size: int = 256  # tokens per training sequence (the context the model learns)
    batch_size: int = 12  # sequences per micro-batch on each process
    # random: windows at random offsets (nanoGPT); sequential: consecutive windows, an epoch at
    # a time (every token seen once per epoch).
    loader: Literal["random", "sequential"] = "random"


@dataclass
class OptimConfig:
    """The optimizer; weight decay applies only to matrices (2-D+), never biases or norms."""

    name: Literal["adamw", "lamb"] = "adamw"
    lr: float = 6e-4  # peak learning rate, reached after warmup
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping


@dataclass
class ScheduleConfig:
    """Learning rate per step: linear warmup, then cosine, warmup-stable-decay or constant."""

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr: float = 6e-5  # where cosine and WSD end
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly to min_lr


@dataclass
class RunConfig:
    """The loop: length, precision, evaluation, sampling, checkpoints and where outputs go."""

    max_steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    objective: Literal["clm", "mlm"] = "clm"  # causal LM (decoders) or masked LM (encoders)
    mlm_probability: float = 0.15  # MLM: share of positions predicted
    mask_token_id: int | None = None  # MLM: None reads [MASK] or <mask> from the tokenizer
    eval_every: int = 250  # steps between validation passes; 0: only at the end
    eval_batches: int = 20  # batches per validation pass
    sample_every: int = 0  # steps between sample generations; 0: never
    sample_tokens: int = 200
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # the newest N step-* folders are kept
    resume: bool | str = False  # true: out_dir's latest checkpoint (if any); or a folder
    out_dir: str = "runs/pretrain"
    seed: int = 1337
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # autocast dtype
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block in backward (saves memory)
    fsdp: bool = False  # under torchrun: shard with FSDP2 instead of replicating with DDP
    # Under torchrun: split every block's matmuls over all ranks (Megatron tensor parallelism,
    # pagoda.train.tensor_parallel) instead of DDP; every rank then reads the same batches.
    tensor_parallel: bool = False
    peak_flops: float | None = None  # for MFU; None: a table for known GPUs, measured on CPU
    progress: bool = True  # a progress bar with loss, tokens/s and MFU


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
            "train": RunConfig}


@dataclass
class PretrainConfig:
    """A whole run. `model` holds `preset` (a name in pagoda.model.presets) and/or any
    `ModelConfig` fields; `vocab_size` defaults to the shards' vocabulary."""

    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        """Reject impossible values, one clear line each (model fields: when it is built)."""
        d, o, s, t = self.data, self.optim, self.schedule, self.train

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(bool(d.shards), "data.shards is required: a folder made by `pagoda data tokenize`")
        for key, value in (("data.block_size", d.block_size), ("data.batch_size", d.batch_size),
                           ("train.max_steps", t.max_steps), ("train.grad_accum", t.grad_accum),
                           ("train.eval_batches", t.eval_batches),
                           ("train.keep_checkpoints", t.keep_checkpoints),
                           ("train.sample_tokens", t.sample_tokens)):
            need(value > 0, f"{key} must be positive, got {value}")
        for key, value in (("schedule.warmup_steps", s.warmup_steps),
                           ("train.eval_every", t.eval_every),
                           ("train.sample_every", t.sample_every),
                           ("train.checkpoint_every", t.checkpoint_every),
                           ("optim.weight_decay", o.weight_decay),
                           ("optim.grad_clip", o.grad_clip)):
            need(value >= 0, f"{key} must be 0 or more, got {value}")
        need(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
        need(o.eps > 0, f"optim.eps must be positive, got {o.eps}")
        need(all(0 <= b < 1 for b in o.betas), f"optim.betas must be in [0, 1), got {o.betas}")
        need(0 <= s.min_lr <= o.lr, f"schedule.min_lr must be in [0, optim.lr={o.lr}], "
                                    f"got {s.min_lr}")
        need(0 < s.decay_fraction <= 1, f"schedule.decay_fraction must be in (0, 1], "
                                        f"got {s.decay_fraction}")
        need(0 < t.mlm_probability < 1, f"train.mlm_probability must be in (0, 1), "
                                        f"got {t.mlm_probability}")
        need(not (t.tensor_parallel and t.fsdp),
             "train.tensor_parallel and train.fsdp cannot be combined: tensor parallelism "
             "uses every rank for one model replica (no data parallelism to shard over)")
        need(t.peak_flops is None or t.peak_flops > 0,
             f"train.peak_flops must be positive, got {t.peak_flops}")

    def model_config(self, vocab_size: int, eot_id: int | None = None) -> ModelConfig:
        """The ModelConfig: a preset plus overrides, checked against the data and objective;
        the vocabulary size and end-of-text id default to the shards'."""
        fields = dict(self.model)
        preset = fields.pop("preset", None)
        fields.setdefault("vocab_size", vocab_size)
        if eot_id is not None:
            fields.setdefault("eos_token_id", eot_id)
        cfg = ModelConfig.from_name(preset, **fields) if preset else ModelConfig.from_dict(fields)
        if cfg.vocab_size < vocab_size:
            raise ConfigError(f"model.vocab_size ({cfg.vocab_size}) is smaller than the shards' "
                              f"vocabulary ({vocab_size})")
        if self.data.block_size > cfg.max_seq_len:
            raise ConfigError(f"data.block_size ({self.data.block_size}) exceeds the model's "
                              f"max_seq_len ({cfg.max_seq_len})")
        if not cfg.lm_head:
            raise ConfigError(f"model '{cfg.name}' has no lm head to train; set model.lm_head: "
                              "true (and tie_embeddings as wanted)")
        if self.train.objective == "mlm" and cfg.causal:
            raise ConfigError("train.objective mlm needs an encoder: set model.causal: false")
        if self.train.objective == "clm" and not cfg.causal:
            raise ConfigError("train.objective clm needs a causal model (model.causal: true); "
                              "use objective mlm for encoders")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists for tuples), as saved in checkpoints and metrics."""
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                data: dict[str, Any] | None = None) -> PretrainConfig:
    """Read YAML (or take `data`), apply `section.key=value` overrides, check every field."""
    if data is None:
        data = read_yaml(Path(path)) if path else {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of sections")
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    apply_overrides(data, overrides, _hint)
    cfg = _build(data)
    cfg.validate()
    return cfg


def _build(data: dict[str, Any]) -> PretrainConfig:
    check_sections(data, ["model", *SECTIONS])
    model = data.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError("section model must be a mapping")
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} | {"preset"}
    bad = sorted(set(model) - model_fields)
    if bad:
        raise ConfigError(f"unknown key model.{bad[0]} (allowed: {', '.join(sorted(model_fields))})")
    model = {k: check(v, _hint("model", k), f"model.{k}") for k, v in model.items()}
    sections = {name: build_section(cls, name, data.get(name) or {})
                for name, cls in SECTIONS.items()}
    return PretrainConfig(model=model, **sections)


def _hint(section: str, name: str) -> Any:
    """The declared type of `section.name` (Any for keys that will be rejected later)."""
    if section == "model":
        return str if name == "preset" else field_type(ModelConfig, name)
    cls = SECTIONS.get(section)
    return field_type(cls, name) if cls else Any


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG and --set, shared by `pagoda pretrain` and `python -m pagoda.train`."""
    parser.add_argument("config", help="YAML run config (see docs/training.md)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one field, e.g. --set optim.lr=3e-4 (repeatable)")
