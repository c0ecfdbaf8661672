"""Group-wise symmetric int8 / int4 weight storage for Linear layers (QLoRA's frozen base, and
the compression storey's weight-only quantization).

Each row of a weight (out, in) is cut into groups of `group_size` inputs; a group keeps one
float scale = absmax / qmax and integers q = round(w / scale) in [-qmax, qmax] (127 for int8,
7 for int4). int8 values are stored as int8; int4 values are offset by 8 to 1..15 and packed two
per uint8 (even input in the low nibble, odd input in the high one). The forward pass
dequantizes into the input's dtype and calls `F.linear`: memory holds ~1/4 (int8) or ~1/8 (int4)
of the fp32 weight, and nothing dequantized is kept between calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.errors import ConfigError

QMAX = {8: 127, 4: 7}  # symmetric range: -qmax..qmax, so zero is exact and the sign is free
INT4_OFFSET = 8  # int4 stored unsigned: q + 8 in 0..15


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int values in [-8, 7], shape (..., n) with n even, into uint8 (..., n // 2)."""
    if q.shape[-1] % 2:
        raise ConfigError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    u = (q.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 (..., m) -> int8 (..., 2m) in [-8, 7]."""
    low = (packed & 0x0F).to(torch.int8) - INT4_OFFSET
    high = (packed >> 4).to(torch.int8) - INT4_OFFSET
    return torch.stack((low, high), dim=-1).flatten(-2)


def check_quant_args(bits: int, group_size: int, in_features: int, where: str = "") -> None:
    """Raise ConfigError unless `bits`/`group_size` can quantize a layer with `in_features`."""
    at = f" ({where})" if where else ""
    if bits not in QMAX:
        raise ConfigError(f"quantization bits must be 4 or 8, got {bits}{at}")
    if group_size < 1 or (bits == 4 and group_size % 2):
        raise ConfigError(f"group_size must be a positive{' even' if bits == 4 else ''} number "
                          f"for int{bits}, got {group_size}{at}")
    if in_features % group_size:
        raise ConfigError(f"group_size {group_size} does not divide in_features {in_features}"
                          f"{at}: pick a divisor of {in_features}")


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int,
                    scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored integers, scales (out, in // group_size)) of a float weight (out, in).

    Scales are rounded to `scale_dtype` (default: the weight's) before dividing, so that
    dequantization with the stored scales is exactly what was rounded here."""
    out_f, in_f = weight.shape
    check_quant_args(bits, group_size, in_f)
    qmax = QMAX[bits]
    groups = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    scales = (groups.abs().amax(dim=-1) / qmax).to(scale_dtype or weight.dtype)  # (out, G)
    divisor = scales.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    q = torch.round(groups / divisor).clamp_(-qmax, qmax).to(torch.int8).reshape(out_f, in_f)
    return (pack_int4(q) if bits == 4 else q), scales


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, bits: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Float weight (out, in) in `dtype` from stored integers and per-group scales."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    out_f, n_groups = scales.shape
    groups = q.to(dtype).view(out_f, n_groups, -1) * scales.to(dtype).unsqueeze(-1)
    return groups.view(out_f, -1)


class QuantizedLinear(nn.Module):
    """A frozen Linear whose weight is stored as group-wise int8 or packed int4.

    Buffers only (`qweight`, `scales`, optional float `bias`): no trainable parameters, and the
    model's state_dict saves and loads like any other (build the same structure, then load)."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 64,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_quant_args(bits, group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        stored = (torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
                  if bits == 4 else
                  torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("qweight", stored)
        self.register_buffer("scales", torch.empty(out_features, in_features // group_size,
                                                   dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device)
                             if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 64) -> QuantizedLinear:
        """Quantize an nn.Linear's weight (scales and bias keep its float dtype)."""
        weight = linear.weight
        check_quant_args(bits, group_size, linear.in_features)
        layer = cls(linear.in_features, linear.out_features, bits, group_size,
                    bias=linear.bias is not None, dtype=weight.dtype, device=weight.device)
        qweight, scales = quantize_weight(weight, bits, group_size)
        layer.qweight.copy_(qweight)
        layer.scales.copy_(scales)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight (out, in), built on the fly (in the scales' dtype by default)."""
        return dequantize_weight(self.qweight, self.scales, self.bits, dtype or self.scales.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight (to export or merge into)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.scales.device, dtype=self.scales.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if not torch.is_grad_enabled() or not x.requires_grad:
            return F.linear(x, self.dequantize(x.dtype), bias)
        return _FrozenQuantizedMatmul.apply(x, self, bias)

    def weight_bytes(self) -> int:
        """Bytes this layer's weight occupies: the integers plus the scales (bias excluded)."""
        return (self.qweight.numel() * self.qweight.element_size()
                + self.scales.numel() * self.scales.element_size())

    def dense_weight_bytes(self) -> int:
        """Bytes the same weight takes as a dense matrix in the scales' float dtype."""
        return self.in_features * self.out_features * self.scales.element_size()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """x @ W.T (+ b) for a frozen quantized W that backward dequantizes again instead of
    autograd keeping the float copy of every layer alive until then (QLoRA's memory saving:
    only the integers and the input gradient path are needed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad @ ctx.layer.dequantize(grad.dtype), None, None


def shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied weights, e.g. lm_head/embed)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def quantize_linears(model: nn.Module, bits: int = 4, group_size: int = 64,
                     skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace every nn.Linear of `model` in place by a QuantizedLinear; returns their names.

    Skipped: modules whose name ends with an entry of `skip`, and Linears whose weight is tied
    to another module's (lm_head tied to the embedding: quantizing would untie them). Every
    layer is checked before any is replaced, so a bad group_size changes nothing."""
    if bits not in QMAX:
        raise ConfigError(f"quantization bits must be 4 or 8, got {bits}")
    tied = shared_parameter_ids(model)
    chosen = [(name, module) for name, module in model.named_modules()
              if type(module) is nn.Linear and not name.endswith(tuple(skip))
              and id(module.weight) not in tied]
    for name, module in chosen:
        check_quant_args(bits, group_size, module.in_features, where=name)
    for name, module in chosen:
        model.set_submodule(name, QuantizedLinear.from_linear(module, bits, group_size))
    return [name for name, _ in chosen]


def weight_storage(model: nn.Module) -> tuple[int, int]:
    """(bytes the quantized layers' weights occupy, bytes they took as dense float weights):
    what quantization saved, for logs such as the fine-tuning loop's."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    return sum(m.weight_bytes() for m in layers), sum(m.dense_weight_bytes() for m in layers)
