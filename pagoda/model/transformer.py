"""The Transformer: token embedding -> N blocks of (attention, FFN) with residuals -> logits.

One class for every decoder in `presets.py` (and encoders, with `causal=False`). Read it top to
bottom: `Block` is one storey of attention + feed-forward, `Transformer` stacks them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.model.attention import Attention
from pagoda.model.config import ModelConfig
from pagoda.model.ffn import MixtureOfExperts, build_ffn
from pagoda.model.kv_cache import AttentionCache
from pagoda.model.norm import build_norm
from pagoda.model.position import rope_table, sinusoidal_table


class Block(nn.Module):
    """Attention then feed-forward, each wrapped in a residual and a norm (pre or post)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = build_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = build_norm(cfg)
        self.ffn = build_ffn(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: AttentionCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.resid_dropout(self.attn(self.attn_norm(x), rope, cache, mask))
            return x + self.ffn(self.ffn_norm(x))
        x = self.attn_norm(x + self.resid_dropout(self.attn(x, rope, cache, mask)))
        return self.ffn_norm(x + self.ffn(x))


class Transformer(nn.Module):
    """A config-driven language model; `forward` maps token ids to next-token logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = (nn.Embedding(cfg.max_seq_len, cfg.d_model)
                          if cfg.pos_encoding == "learned" else None)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.final_norm = build_norm(cfg) if cfg.final_norm else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._build_position_tables()
        if not self.embed.weight.is_meta:
            self.reset_parameters()

    def _build_position_tables(self) -> None:
        """Fixed tables (not parameters, not saved): RoPE cos/sin or the original sinusoids."""
        cfg = self.cfg
        device = self.embed.weight.device  # meta while shapes-only; rebuilt after loading
        if cfg.pos_encoding == "rope":
            cos, sin = rope_table(cfg)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)
        elif cfg.pos_encoding == "sinusoidal":
            table = sinusoidal_table(cfg.max_seq_len, cfg.d_model).to(device)
            self.register_buffer("sinusoids", table, persistent=False)

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor, cache: AttentionCache | None = None,
                last_only: bool = False, positions: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T); (B, 1, vocab) when last_only, and
        (B, len(keep), vocab) for only the token indices `keep` (the head is a big matmul).

        With a cache, idx holds only the new tokens and attends to everything cached before;
        `positions` (B, T) overrides the absolute positions (e.g. for packed sequences).
        """
        B, T = idx.shape
        if positions is None:
            positions = (cache.positions(T) if cache is not None
                         else torch.arange(T, device=idx.device).expand(B, T))
        x = self.embed(idx)  # (B, T, d)
        if self.cfg.scale_embeddings:
            x = x * math.sqrt(self.cfg.d_model)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        elif self.cfg.pos_encoding == "sinusoidal":
            x = x + self.sinusoids[positions]
        x = self.embed_dropout(x)
        rope = None
        if self.cfg.pos_encoding == "rope":
            rope = (self.rope_cos[positions].unsqueeze(1).to(x.dtype),  # (B, 1, T, hd)
                    self.rope_sin[positions].unsqueeze(1).to(x.dtype))
        mask = cache.attention_mask(T) if cache is not None else self._window_mask(T, idx.device)
        for block in self.layers:
            x = block(x, rope, cache, mask)
        if cache is not None:
            cache.advance(T)
        if keep is not None:
            x = x[:, keep]
        elif last_only:
            x = x[:, -1:]
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.lm_head(x)  # (B, T, vocab)

    def _window_mask(self, T: int, device: torch.device) -> torch.Tensor | None:
        """Causal sliding-window mask (1, 1, T, T) when the window is shorter than T, else None."""
        window = self.cfg.sliding_window
        if window is None or T <= window or not self.cfg.causal:
            return None  # plain causal (or bidirectional) attention: SDPA handles it
        slot = torch.arange(T, device=device)
        distance = slot.unsqueeze(1) - slot.unsqueeze(0)  # (T, T) query slot - key slot
        return ((distance >= 0) & (distance < window))[None, None]

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy plus the MoE load-balancing loss when experts exist."""
        logits = self(idx)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                             ignore_index=ignore_index)
        return ce + self.cfg.moe_aux_loss_coef * self.aux_loss

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' load-balancing losses from the last forward (0 if dense)."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MixtureOfExperts)]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.embed.weight.device)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @classmethod
    def on_meta(cls, cfg: ModelConfig) -> Transformer:
        """Build without allocating weights (shapes only), e.g. to count GPT-3's parameters."""
        with torch.device("meta"):
            return cls(cfg)
