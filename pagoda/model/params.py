"""Parameter arithmetic: exact counts per component and the memory they imply (`pagoda params`).

Counts come from the real module tree built on the meta device, so they can never drift from
the model code; nothing is allocated, which is how GPT-3 (175B) is counted on a laptop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from pagoda.model.config import ModelConfig
from pagoda.model.transformer import Transformer

# Storage width of one weight: bf16 and fp16 are the same size; int8/int4 ignore group scales.
WEIGHT_BITS = {"fp32": 32, "bf16": 16, "int8": 8, "int4": 4}
# Bytes of one cached key or value element.
KV_BYTES = {"fp32": 4, "bf16": 2}
# Mixed-precision AdamW per parameter (ZeRO paper, Rajbhandari et al. 2020): bf16 weights 2 +
# bf16 grads 2 + fp32 master weights 4 + Adam m 4 + Adam v 4. Pure fp32 training is also 16
# (weights 4 + grads 4 + m, v 8). Activations are excluded: they depend on batch and sequence.
TRAIN_BYTES_PER_PARAM = 16

# Module name -> component label; biases get " bias" appended, MoE experts "experts ..." names.
_LABELS = {
    "embed": "token embedding", "pos_embed": "position embedding",
    "type_embed": "token-type embedding", "lm_head": "lm head",
    "q_proj": "attention Wq", "k_proj": "attention Wk", "v_proj": "attention Wv",
    "o_proj": "attention Wo", "router": "MoE router",
    "gate_proj": "FFN gate", "up_proj": "FFN up", "down_proj": "FFN down",
}
# Display order of component groups (by label prefix); unknown parameters go last.
_ORDER = ("token embedding", "position embedding", "token-type embedding", "attention",
          "MoE router", "FFN", "experts", "norms", "lm head")


@dataclass
class ParamReport:
    """Exact parameter counts of one config, plus the memory its weights and KV cache need."""

    name: str
    total: int  # unique parameters (a tied lm head counts once)
    components: dict[str, int]  # label -> parameters summed over layers, in display order
    tied: bool  # lm head shares the token-embedding matrix
    classic: int  # 12·L·d²: attention 4d² + FFN 8d² per layer, no embeddings, norms or biases
    expert: int  # parameters inside MoE experts (0 for a dense model)
    active: int  # parameters one token passes through: non-expert + top_k/n_experts of experts
    kv_per_token: int  # cached elements per token: 2 (K, V) × n_layer × n_kv_head × head_dim
    context: int  # max_seq_len, the longest sequence the KV cache holds

    @property
    def ratio(self) -> float:
        """How far the 12·L·d² rule of thumb is from the exact count (exact / classic)."""
        return self.total / self.classic

    def weight_bytes(self) -> dict[str, int]:
        """Bytes to store the weights at each precision (params × bits / 8)."""
        return {k: (self.total * bits + 7) // 8 for k, bits in WEIGHT_BITS.items()}

    def kv_bytes_per_token(self) -> dict[str, int]:
        """KV-cache bytes each token of one sequence adds."""
        return {k: self.kv_per_token * size for k, size in KV_BYTES.items()}

    def kv_bytes_context(self) -> dict[str, int]:
        """KV-cache bytes for one sequence filling the whole context window."""
        return {k: n * self.context for k, n in self.kv_bytes_per_token().items()}

    @property
    def training_bytes(self) -> int:
        """Weights, gradients and AdamW state in mixed precision; activations excluded."""
        return self.total * TRAIN_BYTES_PER_PARAM

    def to_dict(self) -> dict:
        """Plain JSON form for `pagoda params --json`."""
        return {
            "name": self.name, "total": self.total, "tied": self.tied,
            "components": dict(self.components),
            "classic_12Ld2": self.classic, "exact_over_classic": self.ratio,
            "expert": self.expert, "active": self.active,
            "memory": {
                "weights": self.weight_bytes(),
                "kv_cache_per_token": self.kv_bytes_per_token(),
                "kv_cache_context": self.kv_bytes_context(), "context_tokens": self.context,
                "training_adamw_mixed": self.training_bytes,
            },
        }

    def to_table(self) -> Table:
        """Components with exact count, rounded count and share of the total."""
        table = Table(title=f"{self.name}: {human_count(self.total)} parameters")
        table.add_column("component")
        table.add_column("parameters", justify="right")
        table.add_column("≈", justify="right")
        table.add_column("share", justify="right")
        for label, n in self.components.items():
            if label == "lm head" and self.tied:
                label = "lm head (tied to token embedding)"
            table.add_row(label, f"{n:,}", human_count(n), f"{100 * n / self.total:.1f}%")
        table.add_section()
        table.add_row("total", f"{self.total:,}", human_count(self.total), "100.0%", style="bold")
        if self.expert:
            table.add_row("active per token", f"{self.active:,}", human_count(self.active),
                          f"{100 * self.active / self.total:.1f}%")
        table.add_row("12·L·d² estimate", f"{self.classic:,}", human_count(self.classic),
                      f"exact/est {self.ratio:.3f}")
        return table

    def memory_table(self) -> Table:
        """Weights and KV-cache bytes at each precision."""
        table = Table(title="memory")
        table.add_column("")
        for key in WEIGHT_BITS:
            table.add_column("bf16/fp16" if key == "bf16" else key, justify="right")
        rows = [("weights", self.weight_bytes()),
                ("KV cache per token", self.kv_bytes_per_token()),
                (f"KV cache, {self.context:,} tokens", self.kv_bytes_context())]
        for label, sizes in rows:
            table.add_row(label, *(human_bytes(sizes[k]) if k in sizes else "-"
                                   for k in WEIGHT_BITS))
        return table

    def render(self, console: Console) -> None:
        """Print both tables and the training-memory line."""
        console.print(self.to_table())
        console.print(self.memory_table())
        console.print(f"training with AdamW (mixed precision, {TRAIN_BYTES_PER_PARAM} bytes/param,"
                      f" activations excluded): {human_bytes(self.training_bytes)}")


def count_parameters(cfg: ModelConfig) -> ParamReport:
    """Count the parameters of `cfg` exactly by building it on the meta device."""
    model = Transformer.on_meta(cfg)
    counts: dict[str, int] = {}
    expert = 0
    for name, p in model.named_parameters():  # shared (tied) tensors are yielded once
        label = _label(name)
        counts[label] = counts.get(label, 0) + p.numel()
        if "experts" in name.split("."):
            expert += p.numel()
    if model.lm_head is not None:  # tied: shown as 0, the matrix is the token embedding's
        counts.setdefault("lm head", 0)
    total = sum(counts.values())
    active = total - expert + (expert * cfg.n_experts_per_token // cfg.n_experts if expert else 0)
    return ParamReport(
        name=cfg.name, total=total,
        components=dict(sorted(counts.items(), key=lambda item: _rank(item[0]))),
        tied=model.lm_head is not None and model.lm_head.weight is model.embed.weight,
        classic=12 * cfg.n_layer * cfg.d_model ** 2, expert=expert, active=active,
        kv_per_token=2 * cfg.n_layer * cfg.kv_heads * cfg.dim_head, context=cfg.max_seq_len)


def _label(name: str) -> str:
    """Component of a parameter name such as `layers.3.attn.q_proj.bias` ("attention Wq bias")."""
    *path, module, kind = name.split(".")
    if "norm" in module:
        return "norms"
    if module not in _LABELS:
        return re.sub(r"\.\d+\.", ".*.", name)  # a parameter this table does not know yet
    label = _LABELS[module]
    if "experts" in path:
        label = label.replace("FFN", "experts")
    return f"{label} bias" if kind == "bias" else label


def _rank(label: str) -> int:
    """Position of a label's group in the display order."""
    return next((i for i, group in enumerate(_ORDER) if label.startswith(group)), len(_ORDER))


def human_count(n: int) -> str:
    """Parameters the way papers quote them: 134.5M, 174.6B."""
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    """Bytes in decimal units with three significant digits: 538 MB, 1.08 GB."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            x = n / scale
            digits = 0 if x >= 100 else 1 if x >= 10 else 2
            return f"{x:.{digits}f} {unit}"
    return f"{n} B"
