"""Training objectives over the one `model.Transformer`: causal LM and BERT's masked LM.

An objective maps (model, x, y) to a scalar loss, calling `model(...)` itself so that a
DistributedDataParallel or compiled wrapper runs its own forward. x is a batch window (B, T)
and y its next-token shift; the masked LM ignores y and predicts chosen positions of x itself
(an encoder config: causal false, with an lm head).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.errors import ConfigError

IGNORE = -100  # label of positions that carry no loss (cross_entropy's ignore_index)
MASK_TOKENS = ("[MASK]", "<mask>")

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions, computed in fp32 under autocast."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def causal_lm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-token prediction: y[t] = x[t + 1] from x[..t]."""
    return token_loss(model(x), y)


def mask_tokens(ids: torch.Tensor, mask_id: int, vocab_size: int, probability: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: choose `probability` of the positions; of those 80% become the mask
    token, 10% a random token and 10% stay. Returns (inputs, labels), labels IGNORE elsewhere."""
    def draw() -> torch.Tensor:
        return torch.rand(ids.shape, generator=generator, device=ids.device)

    chosen = draw() < probability
    replaced = chosen & (draw() < 0.8)
    randomized = chosen & ~replaced & (draw() < 0.5)  # half of the remaining 20%
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device=ids.device)
    inputs = torch.where(replaced, mask_id, ids)
    inputs = torch.where(randomized, random_ids, inputs)
    return inputs, torch.where(chosen, ids, IGNORE)


def masked_lm(mask_id: int, vocab_size: int, probability: float) -> Objective:
    """The masked-LM objective: corrupt x, predict the original ids at the chosen positions."""
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        inputs, labels = mask_tokens(x, mask_id, vocab_size, probability)
        labels[:, 0] = torch.where(labels.ne(IGNORE).any(dim=1), labels[:, 0], x[:, 0])
        return token_loss(model(inputs), labels)  # every row predicts at least one position
    return loss


class ObjectiveLoss(nn.Module):
    """A model and its objective as one module mapping a batch (x, y) to the loss.

    Compiling this, not the bare model, puts the forward and the loss in one graph: the fp32
    upcast and the cross-entropy fuse into a pass over the bf16 logits instead of writing fp32
    copies of them (about a fifth of a GPT-2 step on a GPU); and DDP wraps exactly what a step
    calls. It owns no parameters of its own: `model` keeps its names in checkpoints.
    """

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.objective(self.model, x, y)


def find_mask_id(tokenizer, configured: int | None) -> int:
    """The mask token id: the configured one, else the tokenizer's [MASK] or <mask>."""
    if configured is not None:
        return configured
    for token in MASK_TOKENS:
        token_id = tokenizer.token_to_id(token) if tokenizer is not None else None
        if token_id is not None:
            return token_id
    raise ConfigError("masked LM needs a mask token: the tokenizer has no [MASK] or <mask>; "
                      "set train.mask_token_id")
