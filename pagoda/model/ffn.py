"""Position-wise feed-forward blocks: plain (GPT-2), gated (SwiGLU), and mixture of experts."""

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.model.config import ModelConfig

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class FeedForward(nn.Module):
    """down(act(up(x))), or down(act(gate(x)) * up(x)) when gated (Shazeer, 2020)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.gate_proj = (nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.ffn_bias)
                          if cfg.gated_ffn else None)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.ffn_bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.ffn_bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(self.hidden(x)))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The d_ff-wide activation: act(up(x)), or act(gate(x)) * up(x) when gated."""
        if self.gate_proj is None:
            return self.act(self.up_proj(x))
        return self.act(self.gate_proj(x)) * self.up_proj(x)


class MixtureOfExperts(nn.Module):
    """Top-k routed experts (Mixtral-style) with the Switch Transformer load-balancing loss.

    A linear router scores every expert per token; the top k are run and their outputs mixed by
    the renormalised router probabilities. `aux_loss` = n_experts * sum_i f_i * P_i, where f_i is
    the fraction of routed slots sent to expert i and P_i its mean router probability; it is
    smallest when tokens spread evenly, so adding it to the training loss keeps experts in use.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.n_experts_per_token
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(cfg) for _ in range(cfg.n_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        tokens = x.reshape(-1, D)  # (N, D)
        probs = self.router(tokens).float().softmax(dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(tokens[rows]) * weights[rows, slot, None])
        n_experts = len(self.experts)
        routed_fraction = F.one_hot(chosen, n_experts).float().mean(dim=(0, 1))  # (E,)
        self.aux_loss = n_experts * (routed_fraction * probs.mean(dim=0)).sum()
        return out.view(B, T, D)


def build_ffn(cfg: ModelConfig) -> nn.Module:
    """Dense FFN or mixture of experts, as the config asks."""
    return MixtureOfExperts(cfg) if cfg.n_experts else FeedForward(cfg)
