"""Multi-head scaled-dot-product attention with MHA/GQA/MQA and an optional KV cache.

softmax(Q K^T / sqrt(d_head) + mask) V, computed by `F.scaled_dot_product_attention`, which picks
a fused kernel (flash/memory-efficient on GPU, a flash kernel on CPU) when it can.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.model.config import ModelConfig
from pagoda.model.kv_cache import AttentionCache
from pagoda.model.position import apply_rope


class Rotary(nn.Module):
    """Applies RoPE to queries and keys (a module, so inference can swap in a fused kernel)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


class Attention(nn.Module):
    """Projects x to queries/keys/values, attends, and projects back to d_model."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.dim_head
        self.causal = cfg.causal
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.d_model, self.n_head * self.hd, bias=cfg.attn_qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=cfg.attn_qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=cfg.attn_qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.d_model, bias=cfg.attn_out_bias)
        self.rotary = Rotary()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: AttentionCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape  # batch, new tokens, d_model
        q, k, v = self.project(x)
        if rope is not None:
            q, k = self.rotary(q, k, *rope)  # cos, sin: (B, 1, T, hd)
        if cache is not None:  # stores k, v and attends over all S = cached + T keys
            y = cache.attend(self.layer, q, k, v, mask, self._attend)  # (B, H, T, hd)
        else:
            y = self._attend(q, k, v, mask)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, hd), keys and values (B, Hkv, T, hd) of x (B, T, d_model)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, H, T, hd = q.shape
        dropout = self.dropout if self.training else 0.0
        if T == 1 and self.n_kv < H:
            # One new token: every query head of a group sees the same keys, so fold the group
            # into the query-length axis and attend to the shared K/V without copying them.
            qg = q.view(B, self.n_kv, H // self.n_kv, hd)  # (B, Hkv, group, hd)
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, dropout_p=dropout)
            return y.reshape(B, H, 1, hd)
        is_causal = self.causal and mask is None and T > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=is_causal, enable_gqa=self.n_kv < H)
