"""Positional encodings: rotary (RoPE), learned tables, and the original sinusoids.

RoPE rotates query/key pairs by position-dependent angles so attention scores depend on relative
position. We use the "rotate half" pairing of Hugging Face Llama (dimension i pairs with
i + head_dim/2); GGUF files store q/k permuted for the interleaved pairing and are un-permuted
on load.
"""

import math

import torch

from pagoda.model.config import ModelConfig


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), with Llama-3.1 long-context scaling if configured."""
    dim = cfg.dim_head
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling
    if not scaling:
        return inv_freq.float()
    if "freq_factors" in scaling:  # GGUF's rope_freqs tensor: the scaling already computed
        return (inv_freq / torch.tensor(scaling["freq_factors"], dtype=torch.float64)).float()
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(mid, blended, scaled).float()


def rope_table(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim), indexed by absolute position."""
    inv_freq = rope_frequencies(cfg)  # (hd/2,)
    pos = torch.arange(cfg.max_seq_len, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by angles cos/sin (B, 1, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...), as in Vaswani et al."""
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)  # (T, 1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return table
