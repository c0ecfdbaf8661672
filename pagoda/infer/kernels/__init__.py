"""Native CPU kernels for decoding, compiled on first use (torch's C++ extension builder).

`skinny_linear` computes x @ w.T (+ b) for inputs of 1-64 rows — every decode step of a batch — splitting the
weight rows over torch's thread pool; MKL runs these shapes on one thread at about half the
memory bandwidth. `rms_norm` and `rope_` replace a dozen small torch ops each. `decode_block`
runs a whole pre-norm Llama-style block for one new token per sequence over the paged KV cache:
the ~30 torch ops of a block cost more in dispatch than their arithmetic, a third of a decode
step. The model keeps its readable PyTorch code: `use_native_kernels` swaps in subclasses that
call the kernels only for no-grad fp32 CPU inputs, and anything else, or a machine where the
build fails, runs the original forward.
"""

from __future__ import annotations

import logging
import os
import platform
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.model.attention import Attention, Rotary
from pagoda.model.ffn import FeedForward
from pagoda.model.kv_cache import AttentionCache
from pagoda.model.lora import LoRALinear
from pagoda.model.norm import RMSNorm
from pagoda.model.transformer import Block
from pagoda.paths import pagoda_home

log = logging.getLogger(__name__)
MAX_ROWS = 64
_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")


@lru_cache(maxsize=1)
def native_available() -> bool:
    """Build (once, cached under $PAGODA_HOME/kernels) and load the kernels; False if impossible."""
    if os.environ.get("PAGODA_NO_KERNELS") or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        if "avx2" not in Path("/proc/cpuinfo").read_text():
            return False
        from torch.utils.cpp_extension import load

        build = pagoda_home() / "kernels" / f"torch-{torch.__version__}"
        build.mkdir(parents=True, exist_ok=True)
        load(name="pagoda_kernels", sources=[str(_SOURCE)], build_directory=str(build),
             extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
        return True
    except Exception as exc:  # no compiler, no ninja, unusual platform: stay correct, just slower
        log.warning("native decode kernels unavailable, using torch's linear (%s)", exc)
        return False


def _native(x: torch.Tensor) -> bool:
    """Whether this call may take a kernel: fp32 on CPU, no autograd."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


def _dense(*projections: nn.Module) -> bool:
    """Whether these projections hold float weight matrices the kernels can fuse (not int4/int8
    QuantizedLinear layers, whose weights exist only dequantized inside their forward)."""
    return all(isinstance(p.base if isinstance(p, LoRALinear) else p, nn.Linear)
               for p in projections)


def _adapted(*projections: nn.Module) -> bool:
    """Whether a LoRA adapter changes any of these projections in this pass (their fused
    weights would skip it): an active unmerged adapter, or per-token routing."""
    return any(isinstance(p, LoRALinear) and (p.routing is not None or (
        p.active is not None and p.active not in p.merged)) for p in projections)


class SkinnyLinear(nn.Linear):
    """nn.Linear whose few-row calls go to the native kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _native(x):
            return F.linear(x, self.weight, self.bias)
        return _linear(x, self.weight, self.bias)


class NativeRMSNorm(RMSNorm):
    """RMSNorm computed by one kernel call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _native(x):
            return super().forward(x)
        return torch.ops.pagoda_kernels.rms_norm(x, self.weight, self.eps)


class NativeRotary(Rotary):
    """RoPE applied in place to the fresh q/k projections by one kernel call each."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not _native(q) or q.stride(-1) != 1 or k.stride(-1) != 1:
            return super().forward(q, k, cos, sin)
        torch.ops.pagoda_kernels.rope_(q, cos, sin)
        torch.ops.pagoda_kernels.rope_(k, cos, sin)
        return q, k


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of Linears reading the same input into one matrix,
    re-pointing each Linear at its slice so no memory is duplicated."""
    with torch.inference_mode(False), torch.no_grad():  # must stay usable for training
        weight = torch.cat([lin.weight for lin in linears])
        bias = (torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None
                else None)
        start = 0
        for lin in linears:
            rows = lin.out_features
            lin.weight.data = weight[start:start + rows]
            if bias is not None:
                lin.bias.data = bias[start:start + rows]
            start += rows
    return weight, bias


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias): the native kernel for up to MAX_ROWS rows, MKL's GEMM beyond."""
    rows, width = x.numel() // x.shape[-1], x.shape[-1]
    if rows > MAX_ROWS:
        return F.linear(x, weight, bias)
    y = torch.ops.pagoda_kernels.skinny_linear(x.reshape(rows, width), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class NativeFeedForward(FeedForward):
    """Gated FFN whose gate and up projections run as one matrix product."""

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        if (self.gate_proj is None or not _native(x) or not hasattr(self, "_gate_up")
                or _adapted(self.gate_proj, self.up_proj)):
            return super().hidden(x)
        gate_up = _linear(x, *self._gate_up)
        if self.act is F.silu:
            return torch.ops.pagoda_kernels.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up


class NativeAttention(Attention):
    """Attention with q/k/v from one matrix product and one-token decode over the cached keys."""

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if (not _native(x) or not hasattr(self, "_qkv")
                or _adapted(self.q_proj, self.k_proj, self.v_proj)):
            return super().project(x)
        B, T, _ = x.shape
        heads = _linear(x, *self._qkv).view(B, T, self.n_head + 2 * self.n_kv, self.hd)
        q, k, v = heads.split([self.n_head, self.n_kv, self.n_kv], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        if q.shape[2] != 1 or not _native(q) or not self.causal:
            return super()._attend(q, k, v, mask)
        return torch.ops.pagoda_kernels.decode_attention(q, k, v, mask)


class NativeBlock(Block):
    """A block that decodes one token per sequence in one kernel call when it can: pre-norm,
    RMSNorm, RoPE, SwiGLU, causal, over a paged KV cache (`decode_view`); else Block.forward."""

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: AttentionCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        view = getattr(cache, "decode_view", None)
        view = view(self.attn.layer) if view is not None and T == 1 else None
        attn, ffn = self.attn, self.ffn
        if (view is None or rope is None or not self._fusable or B > MAX_ROWS or self.training
                or not _native(x) or _adapted(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                              ffn.gate_proj, ffn.up_proj, ffn.down_proj)):
            return super().forward(x, rope, cache, mask)
        k_pool, v_pool, new_slots, tables, lengths, block_size = view
        y = torch.ops.pagoda_kernels.decode_block(
            x.reshape(B, D), self.attn_norm.weight, self.ffn_norm.weight, self.attn_norm.eps,
            *attn._qkv, attn.o_proj.weight, attn.o_proj.bias, *ffn._gate_up,
            ffn.down_proj.weight, ffn.down_proj.bias, rope[0].reshape(B, -1),
            rope[1].reshape(B, -1), k_pool, v_pool, new_slots, tables, lengths, block_size,
            attn.n_head)
        return y.view(B, 1, D)


def _fusable(block: Block) -> bool:
    """Whether `decode_block` computes exactly this block (its structure, not its inputs)."""
    ffn, attn = block.ffn, block.attn
    return (block.pre_norm and type(block.attn_norm) is NativeRMSNorm
            and type(block.ffn_norm) is NativeRMSNorm and block.attn_norm.eps == block.ffn_norm.eps
            and type(ffn) is NativeFeedForward and ffn.gate_proj is not None and ffn.act is F.silu
            and type(attn) is NativeAttention and attn.causal and hasattr(attn, "_qkv"))


_SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: SkinnyLinear, RMSNorm: NativeRMSNorm, Rotary: NativeRotary,
    Attention: NativeAttention, FeedForward: NativeFeedForward, Block: NativeBlock}


def use_native_kernels(model: nn.Module) -> nn.Module:
    """Swap in the kernel-backed subclasses (same parameters, same results) when kernels load."""
    if next(model.parameters()).device.type != "cpu" or not native_available():
        return model
    for module in model.modules():
        if type(module) in _SWAPS:
            module.__class__ = _SWAPS[type(module)]
        if (type(module) is NativeAttention and not hasattr(module, "_qkv")
                and _dense(module.q_proj, module.k_proj, module.v_proj)):
            module._qkv = _fuse([module.q_proj, module.k_proj, module.v_proj])
        elif (type(module) is NativeFeedForward and module.gate_proj is not None
              and not hasattr(module, "_gate_up") and _dense(module.gate_proj, module.up_proj)):
            module._gate_up = _fuse([module.gate_proj, module.up_proj])
    for module in model.modules():  # after the swaps above: fusability reads the new types
        if type(module) is NativeBlock:
            module._fusable = _fusable(module)
    return model
