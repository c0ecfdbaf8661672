"""Tensor parallelism: split each block's matmuls across devices (Megatron-LM's layout).

For models whose weights, gradients and optimizer state do not fit one device even when
sharded by FSDP: every rank of a 1-D `DeviceMesh` holds a slice of every block. The attention
and FFN input projections (q/k/v, gate/up) are split by output column, so each rank computes
n_head/tp query heads, n_kv_head/tp key/value heads and d_ff/tp FFN units on its own; the
output projections (o/down) are split by input row and end in one all-reduce each. So a block
costs one all-reduce after attention and one after the FFN in forward, and two in backward (the
gradients of the attention and FFN inputs). Embeddings, norms and the lm head stay replicated
(small next to the blocks), and so do the activations between blocks (no sequence parallelism).

Built on `torch.distributed.tensor.parallel.parallelize_module`: the sharded weights become
`DTensor`s (`.full_tensor()` gathers one); everything else is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from pagoda.errors import ConfigError
from pagoda.model.transformer import Transformer


def check_divisible(model: Transformer, tp: int) -> None:
    """Raise ConfigError unless heads, key/value heads and d_ff split evenly over tp ranks."""
    cfg = model.cfg
    if cfg.n_experts:
        raise ConfigError("tensor parallelism does not support mixture-of-experts FFNs "
                          f"(config '{cfg.name}' has {cfg.n_experts} experts)")
    for what, size in (("n_head", cfg.n_head), ("n_kv_head", cfg.kv_heads), ("d_ff", cfg.d_ff)):
        if size % tp:
            raise ConfigError(f"tensor parallelism over {tp} ranks needs {what} divisible by "
                              f"{tp}; config '{cfg.name}' has {what}={size}")


def block_plan(gated: bool) -> dict[str, ParallelStyle]:
    """Megatron's plan for one block, keyed by submodule name.

    The attention and FFN inputs are marked replicated DTensors once (`PrepareModuleInput`),
    so the projections reading them share one backward all-reduce of the input gradient.
    """
    def replicated(n_inputs: int) -> PrepareModuleInput:  # x, then n_inputs - 1 non-tensors
        layouts = (Replicate(),) + (None,) * (n_inputs - 1)
        return PrepareModuleInput(input_layouts=layouts, desired_input_layouts=layouts,
                                  use_local_output=False)

    plan: dict[str, ParallelStyle] = {
        "attn": replicated(4),  # Attention.forward(x, rope, cache, mask)
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(),
        "ffn": replicated(1),
        "ffn.up_proj": ColwiseParallel(),
        "ffn.down_proj": RowwiseParallel(),
    }
    if gated:
        plan["ffn.gate_proj"] = ColwiseParallel()
    return plan


def parallelize(model: Transformer, mesh: DeviceMesh) -> Transformer:
    """Shard `model`'s blocks in place over the 1-D `mesh` (every rank must pass the same
    weights) and return it. Each attention module then reshapes to its local head counts.
    For training: a KV cache, sized by the config's full head counts, does not fit the result."""
    if mesh.ndim != 1:
        raise ConfigError(f"tensor parallelism needs a 1-D device mesh, got {mesh.ndim}-D")
    tp = mesh.size()
    check_divisible(model, tp)
    plan = block_plan(model.cfg.gated_ffn)
    for block in model.layers:
        parallelize_module(block, mesh, plan)
        # The projections now yield this rank's heads only; `.view(B, T, heads, hd)` must agree
        # (TorchTitan does the same: attn.n_heads //= tp).
        block.attn.n_head //= tp
        block.attn.n_kv //= tp
    return model


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a model holding both DTensor (sharded) and plain
    (replicated) parameters, which torch's version refuses to mix; returns the total norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    # A DTensor's norm resolves its placement: sharded pieces are combined across ranks.
    norms = [torch.linalg.vector_norm(g.float()) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(
        [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:  # the local shard of a DTensor is its storage: scaling it scales the DTensor
        (g.to_local() if isinstance(g, DTensor) else g).mul_(scale.to(g.dtype))
    return total
