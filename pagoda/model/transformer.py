"""The Transformer: token embedding -> N blocks of (attention, FFN) with residuals -> logits.

One class for every model in `presets.py`: the decoders, and the BERT encoder (`causal=False`,
token types, an embedding norm, post-norm blocks, no lm head: it returns hidden states). Read
it top to bottom: `Block` is one storey of attention + feed-forward, `Transformer` stacks them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pagoda.errors import ConfigError
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
        self.type_embed = (nn.Embedding(cfg.type_vocab_size, cfg.d_model)
                           if cfg.type_vocab_size else None)
        self.embed_norm = build_norm(cfg) if cfg.embed_norm else None
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.final_norm = build_norm(cfg) if cfg.final_norm else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) if cfg.lm_head else None
        # Training switch: recompute each block's activations in backward instead of storing them.
        self.checkpoint_blocks = False
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

    def forward(self, idx: torch.Tensor | None, cache: AttentionCache | None = None,
                last_only: bool = False, positions: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, token_types: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                segments: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T); (B, 1, vocab) when last_only, and
        (B, len(keep), vocab) for only the token indices `keep` (the head is a big matmul), or
        (1, N, vocab) for the N tokens where a (B, T) bool `keep` is True, in row-major order
        (training losses that score only some tokens skip the rest of the vocabulary product).
        A model without an lm head (an encoder) returns its hidden states (B, T, d) instead.

        With a cache, idx holds only the new tokens and attends to everything cached before;
        `positions` (B, T) overrides the absolute positions (e.g. for packed sequences).
        Encoders take `token_types` (B, T) segment ids (default 0, sentence A) and, for a
        right-padded batch without a cache, `attention_mask` (B, T) bool, True for real tokens:
        no token attends to padding, so each row equals that sequence run alone.
        `segments` (B, T) long, uncached only, packs several sequences into a row: a token sees
        only earlier tokens of its own segment (pass `positions` restarting at 0 per segment);
        segment 0 is padding and sees only itself.
        `inputs_embeds` (B, T, d) replaces the token embeddings of idx (pass idx=None): prompt
        tuning trains such vectors, which have no token id.
        """
        source = idx if inputs_embeds is None else inputs_embeds
        B, T = source.shape[:2]
        if cache is not None and (attention_mask is not None or segments is not None):
            raise ValueError("attention_mask and segments are for uncached passes; a cache masks "
                             "its own slots")
        if positions is None:
            positions = (cache.positions(T) if cache is not None
                         else torch.arange(T, device=source.device).expand(B, T))
        x = self.embed(idx) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        if self.cfg.scale_embeddings:
            x = x * math.sqrt(self.cfg.d_model)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        elif self.cfg.pos_encoding == "sinusoidal":
            x = x + self.sinusoids[positions]
        if self.type_embed is not None:
            x = x + (self.type_embed(token_types) if token_types is not None
                     else self.type_embed.weight[0])  # (d,): every token is sentence A
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.embed_dropout(x)
        rope = None
        if self.cfg.pos_encoding == "rope":
            rope = (self.rope_cos[positions].unsqueeze(1).to(x.dtype),  # (B, 1, T, hd)
                    self.rope_sin[positions].unsqueeze(1).to(x.dtype))
        mask = (cache.attention_mask(T) if cache is not None
                else self._self_attention_mask(T, source.device, attention_mask, segments))
        for block in self.layers:
            if self.checkpoint_blocks and self.training and cache is None:
                x = checkpoint(block, x, rope, cache, mask, use_reentrant=False)
            else:
                x = block(x, rope, cache, mask)
        if cache is not None:
            cache.advance(T)
        if keep is not None:
            x = x[keep].unsqueeze(0) if keep.dim() == 2 else x[:, keep]
        elif last_only:
            x = x[:, -1:]
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x if self.lm_head is None else self.lm_head(x)  # (B, T, vocab) or (B, T, d)

    def _self_attention_mask(self, T: int, device: torch.device,
                             attention_mask: torch.Tensor | None,
                             segments: torch.Tensor | None = None) -> torch.Tensor | None:
        """Bool mask (B or 1, 1, T, T), True where a query may see a key; None when SDPA's own
        causal or full attention is exact (no padding or segments, no window shorter than T)."""
        window = self.cfg.sliding_window if self.cfg.causal else None
        if attention_mask is None and segments is None and (window is None or T <= window):
            return None
        slot = torch.arange(T, device=device)
        distance = slot.unsqueeze(1) - slot.unsqueeze(0)  # (T, T) query slot - key slot
        mask = distance >= 0 if self.cfg.causal else torch.ones_like(distance, dtype=torch.bool)
        if window is not None:
            mask = mask & (distance < window)
        mask = mask[None, None]  # (1, 1, T, T)
        if attention_mask is not None:  # hide padding keys: (B, 1, 1, T) broadcast over queries
            mask = mask & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        if segments is not None:  # same segment only; padding (0) sees just its own slot
            seg = segments.to(device)
            same = seg[:, :, None] == seg[:, None, :]  # (B, T, T) query segment == key segment
            same = same & ((seg[:, :, None] != 0) | (distance == 0))
            mask = mask & same[:, None]
        return mask

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy plus the MoE load-balancing loss when experts exist."""
        if self.lm_head is None:
            raise ConfigError(f"config '{self.cfg.name}' has no lm head: it encodes, it does "
                              "not predict tokens")
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
