"""Optimizers and the learning-rate schedule.

Weight decay follows nanoGPT and LitGPT: every tensor with two or more dimensions (matmul weights
and embeddings) decays; biases and norm gains do not (decaying them only hurts). LAMB (You et
al. 2019) is AdamW with a per-tensor trust ratio, for very large batches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pagoda.train.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: 2-D+ tensors with weight decay, the rest (biases, norms) without."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or LAMB over the decay/no-decay groups."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "lamb":
        return Lamb(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


class Lamb(torch.optim.Optimizer):
    """LAMB: the Adam update plus decay, scaled per tensor by ||w|| / ||update||."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (torch's signature)
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                p.sub_(update * (group["lr"] * trust))
        return loss


def learning_rate(step: int, optim: OptimConfig, schedule: ScheduleConfig,
                  max_steps: int) -> float:
    """The LR of optimizer step `step` (0-based): a pure function, so resuming needs only the
    step number. Warmup is nanoGPT's lr * (step + 1) / (warmup + 1)."""
    lr, low, warmup = optim.lr, schedule.min_lr, schedule.warmup_steps
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if schedule.kind == "constant":
        return lr
    if schedule.kind == "wsd":  # stable at lr, then a linear decay over the last fraction
        decay_start = max_steps - max(1, round(schedule.decay_fraction * max_steps))
        if step < decay_start:
            return lr
        return lr + (low - lr) * min(1.0, (step - decay_start + 1) / (max_steps - decay_start))
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))  # cosine
    return low + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - low)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply `lr` to every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
