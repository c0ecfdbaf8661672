"""The pretraining loop: nanoGPT's train.py as a class you can read in one sitting.

`Trainer(cfg).fit()` builds everything from a `PretrainConfig` (shards, tokenizer, model,
optimizer, loader; resuming when asked), then runs optimizer steps of `grad_accum`
micro-batches with the LR of the schedule, autocast, gradient clipping, evaluation, samples,
metrics and checkpoints. Under torchrun (WORLD_SIZE > 1) the model is wrapped in DDP, or
sharded with FSDP2 when `train.fsdp` is set, or split by tensor parallelism over all ranks when
`train.tensor_parallel` is (each rank then sees the same batches); only rank 0 writes logs and
checkpoints.
"""

from __future__ import annotations

import gc
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from pagoda.data.loader import BatchLoader
from pagoda.data.shards import TokenShards, read_index
from pagoda.errors import ConfigError
from pagoda.model.device import DTYPES, pick_device
from pagoda.model.hf_checkpoint import build_from_state
from pagoda.model.transformer import Transformer
from pagoda.tokenizer import Tokenizer
from pagoda.train.checkpoint import find_resume, load_trainer_state, load_weights, save_checkpoint
from pagoda.train.config import PretrainConfig
from pagoda.train.metrics import MetricsLog, flops_per_token, peak_flops, plot_losses
from pagoda.train.objectives import (
    Objective,
    ObjectiveLoss,
    causal_lm,
    find_mask_id,
    masked_lm,
)
from pagoda.train.optim import build_optimizer, learning_rate, set_learning_rate
from pagoda.train.tensor_parallel import clip_grad_norm_, parallelize


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> Distributed:
        """Read torchrun's variables; join the process group (nccl on CUDA, else gloo)."""
        info = cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))
        if info.world_size > 1 and not dist.is_initialized():
            cuda = torch.cuda.is_available() and device != "cpu"
            if cuda:
                torch.cuda.set_device(info.local_rank)
            dist.init_process_group("nccl" if cuda else "gloo")
        return info


class Trainer:
    """One pretraining run; `fit()` trains to `train.max_steps` and returns a summary."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        t, d = cfg.train, cfg.data
        self.dist = Distributed.from_env(t.device)
        self.device = (torch.device("cuda", self.dist.local_rank)
                       if self.dist.world_size > 1 and dist.get_backend() == "nccl"
                       else pick_device(t.device))
        if t.dtype == "float16" and self.device.type != "cuda":
            raise ConfigError("train.dtype float16 needs a CUDA GPU; use bfloat16 on CPU")
        self.train_data = TokenShards.open(d.shards, "train")
        has_val = "val" in read_index(d.shards)["splits"]
        self.val_data = TokenShards.open(d.shards, "val") if has_val else None
        path = self.train_data.tokenizer_path
        self.tokenizer = Tokenizer.from_file(path) if path and path.is_file() else None
        self.model_cfg = cfg.model_config(self.train_data.vocab_size, self.train_data.eot_id)

        self.resume_from = find_resume(t.resume, t.out_dir)
        state = (load_trainer_state(self.resume_from, self.model_cfg.to_dict())
                 if self.resume_from else None)
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.model = Transformer(self.model_cfg).to(self.device)
        if self.resume_from:
            load_weights(self.resume_from, self.model)
        self.model.checkpoint_blocks = t.activation_checkpointing
        self.fsdp = t.fsdp and self.dist.world_size > 1
        # Tensor parallelism: all ranks hold one model, so data-parallel-wise there is one rank.
        self.tp = t.tensor_parallel and self.dist.world_size > 1
        self.dp_rank, self.dp_size = (0, 1) if self.tp else (self.dist.rank, self.dist.world_size)
        if self.tp:
            parallelize(self.model, init_device_mesh(self.device.type, (self.dist.world_size,)))
        self.ddp: DDP | None = None
        self.loss = self._wrap(ObjectiveLoss(self.model, self._objective()))  # (x, y) -> loss
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.dtype == "float16")
        self.loader = BatchLoader(self.train_data, d.block_size, d.batch_size, seed=t.seed,
                                  mode=d.loader, rank=self.dp_rank, world_size=self.dp_size)
        self.step = 0
        seed_everything(t.seed + self.dp_rank)  # dropout and masking differ per DP rank
        if state is not None:
            self._restore(state)

    # ----------------------------------------------------------------- set-up
    def _wrap(self, step_loss: ObjectiveLoss) -> torch.nn.Module:
        """FSDP2 (sharding the model inside) or DDP under torchrun, then torch.compile; returns
        what a step calls."""
        wrapped: torch.nn.Module = step_loss
        if self.fsdp:
            for block in self.model.layers:
                fully_shard(block)
            fully_shard(self.model)
        elif self.dist.world_size > 1 and not self.tp:
            self.ddp = wrapped = DDP(step_loss, device_ids=[self.device.index]
                                     if self.device.type == "cuda" else None)
        return torch.compile(wrapped) if self.cfg.train.compile else wrapped

    def _objective(self) -> Objective:
        t = self.cfg.train
        if t.objective == "clm":
            return causal_lm
        mask_id = find_mask_id(self.tokenizer, t.mask_token_id)
        return masked_lm(mask_id, self.train_data.vocab_size, t.mlm_probability)

    def _autocast(self):
        dtype = self.cfg.train.dtype
        return torch.autocast(self.device.type, dtype=DTYPES[dtype], enabled=dtype != "float32")

    def _grad_sync(self, last: bool):
        """Reduce gradients across ranks only on the last micro-batch of a step."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        return self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.dist.world_size > 1:
            dist.all_reduce(value)  # SUM: gloo has no AVG
            value = value / self.dist.world_size
        return value.item()

    # ------------------------------------------------------------------ steps
    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches: (mean loss, gradient norm)."""
        accum, clip = self.cfg.train.grad_accum, self.cfg.optim.grad_clip
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = (b.to(self.device, non_blocking=True) for b in self.loader.next())
            with self._grad_sync(micro == accum - 1):
                with self._autocast():
                    loss = self.loss(x, y)
                    if self.model_cfg.n_experts:
                        loss = loss + self.model_cfg.moe_aux_loss_coef * self.model.aux_loss
                self.scaler.scale(loss / accum).backward()
            total += loss.detach() / accum
        self.scaler.unscale_(self.optimizer)
        clip_norm = clip_grad_norm_ if self.tp else torch.nn.utils.clip_grad_norm_
        norm = clip_norm(self.model.parameters(), clip or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        return self._mean_over_ranks(total), norm.item()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over eval_batches fixed batches (the same ones every time)."""
        t, d = self.cfg.train, self.cfg.data
        loader = BatchLoader(self.val_data, d.block_size, d.batch_size, seed=t.seed + 1,
                             rank=self.dp_rank)
        total = torch.zeros((), device=self.device)
        self.model.eval()
        with self._fork_rng():
            for _ in range(t.eval_batches):
                x, y = (b.to(self.device) for b in loader.next())
                with self._autocast():
                    total += self.loss(x, y).float()
        self.model.train()
        return self._mean_over_ranks(total / t.eval_batches)

    @torch.no_grad()
    def sample(self, temperature: float = 0.8, top_k: int = 200) -> str:
        """A generation from the separator (else the corpus's first token), nanoGPT's sampler.
        Every rank runs it (FSDP needs them all for a forward); the RNG is forked and seeded."""
        t = self.cfg.train
        eot = self.train_data.eot_id
        prompt = [eot] if eot is not None else self.train_data.read(0, 1).tolist()
        ids = torch.tensor([prompt], device=self.device)
        self.model.eval()
        with self._fork_rng():
            torch.manual_seed(t.seed)
            for _ in range(t.sample_tokens):
                with self._autocast():
                    # the last block_size tokens: positions beyond it were never trained
                    logits = self.model(ids[:, -self.cfg.data.block_size:], last_only=True)
                logits = logits[:, -1].float() / temperature
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                probs = torch.softmax(logits.masked_fill(logits < kth, -math.inf), dim=-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1)], dim=1)
        self.model.train()
        return self.tokenizer.decode(ids[0, len(prompt):].tolist())

    def _fork_rng(self):
        """Evaluation and sampling must not move the training RNG (exact resume)."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    # ------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train until train.max_steps; return the last metrics and where the run wrote."""
        t, d = self.cfg.train, self.cfg.data
        out = _out_dir(t.out_dir)
        per_step = d.batch_size * d.block_size * t.grad_accum * self.dp_size
        model_flops = flops_per_token(self.model, d.block_size) * per_step
        peak = peak_flops(self.device, t.peak_flops) * self.dist.world_size
        log = (MetricsLog(out / "metrics.jsonl", self.step if self.resume_from else None)
               if self.dist.main else None)
        bar = tqdm(total=t.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.dist.main and t.progress))
        started, trained_s, trained_steps = time.perf_counter(), 0.0, 0
        record: dict[str, Any] = {}
        while self.step < t.max_steps:
            lr = learning_rate(self.step, self.cfg.optim, self.cfg.schedule, t.max_steps)
            set_learning_rate(self.optimizer, lr)
            tick = time.perf_counter()
            loss, grad_norm = self.train_step()  # .item() waits for the GPU
            elapsed = time.perf_counter() - tick
            trained_s, trained_steps = trained_s + elapsed, trained_steps + 1
            self.step += 1
            record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tok_s": per_step / elapsed, "mfu": model_flops / elapsed / peak}
            if self.val_data is not None and self._due(t.eval_every):
                record["val_loss"] = self.evaluate()
                record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
                self._report(f"step {self.step}: val loss {record['val_loss']:.4f}")
            if t.sample_every and self._due(t.sample_every) and self._can_sample():
                record["sample"] = self.sample()
                self._report(f"step {self.step} sample:\n{record['sample']}")
            if log is not None:
                log.write(record)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tok_s']:.0f}",
                            mfu=f"{100 * record['mfu']:.1f}%")
            bar.update()
            if self._due(t.checkpoint_every):
                self.save()
        bar.close()
        summary = {**record, "steps": self.step, "wall_s": time.perf_counter() - started,
                   "tok_s": per_step * trained_steps / trained_s if trained_s else 0.0,
                   "out_dir": str(out), "rank": self.dist.rank}
        if log is not None:
            summary["loss_png"] = str(plot_losses(log.records(), out / "loss.png",
                                                  title=self.model_cfg.name))
        return summary

    def _due(self, every: int) -> bool:
        """Whether something done every N steps (0: only at the end) happens now."""
        return self.step == self.cfg.train.max_steps or bool(every and self.step % every == 0)

    def _report(self, text: str) -> None:
        """A line for the user on stderr (stdout stays clean for --json), from rank 0 only."""
        if self.dist.main:
            tqdm.write(text, file=sys.stderr)

    def _can_sample(self) -> bool:
        return self.tokenizer is not None and self.model_cfg.causal

    # ------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Write a checkpoint of the state after `self.step` steps (collective under torchrun)."""
        t = self.cfg.train
        mine = {"rng": rng_state(self.device), "loader": self.loader.state_dict()}
        ranks = [mine]
        if self.dist.world_size > 1:
            ranks = [None] * self.dist.world_size if self.dist.main else None
            dist.gather_object(mine, ranks, dst=0)
        model, optimizer = self._full_states()
        if self.dist.main:
            state = {"step": self.step, "config": self.cfg.to_dict(),
                     "model_config": self.model_cfg.to_dict(), "optimizer": optimizer,
                     "scaler": self.scaler.state_dict(), "world_size": self.dist.world_size,
                     "ranks": ranks}
            save_checkpoint(t.out_dir, self.step, model, state,
                            self.train_data.tokenizer_path, keep=t.keep_checkpoints)
        if self.dist.world_size > 1:
            dist.barrier()

    def _full_states(self) -> tuple[Transformer, dict]:
        """The unsharded model and optimizer state (FSDP and TP gather them; a collective)."""
        if not (self.fsdp or self.tp):
            return self.model, self.optimizer.state_dict()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.model, options=options)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        model = (build_from_state(self.model_cfg, dict(weights), torch.float32, "cpu",
                                  "the sharded model")
                 if self.dist.main else None)
        return model, optimizer

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue a checkpointed run: optimizer, step, RNG states, loader position."""
        if self.fsdp or self.tp:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        if state["world_size"] == self.dist.world_size:
            mine = state["ranks"][self.dist.rank]
            self.loader.load_state_dict(mine["loader"])
            set_rng_state(mine["rng"], self.device)
        else:  # other batches than the original run, but from the same distribution
            self._report(f"resuming a {state['world_size']}-process run on "
                         f"{self.dist.world_size}: data order and RNG start afresh")
        self._report(f"resumed from {self.resume_from} at step {self.step}")


def _out_dir(path: str) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG's state as plain data (what torch.load(weights_only=True) reads back)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of `rng_state`."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run `cfg` to the end (the library entry point behind `pagoda pretrain`)."""
    try:
        return Trainer(cfg).fit()
    finally:
        if dist.is_initialized():
            gc.collect()  # sharded tensors left to interpreter teardown can abort the process
            dist.destroy_process_group()
