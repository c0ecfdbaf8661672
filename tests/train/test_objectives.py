"""Objectives: BERT's masking proportions and a causal LM that learns a repeated pattern."""

from __future__ import annotations

import pytest
import torch

from pagoda.errors import ConfigError
from pagoda.model.config import ModelConfig
from pagoda.model.transformer import Transformer
from pagoda.train.objectives import IGNORE, causal_lm, find_mask_id, mask_tokens, masked_lm


def test_masking_proportions_follow_bert():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 30000, (64, 1024), generator=generator)
    inputs, labels = mask_tokens(ids, mask_id=1, vocab_size=30000, generator=generator)
    chosen = labels != IGNORE
    n = chosen.sum().item()
    assert n / ids.numel() == pytest.approx(0.15, abs=0.005)
    assert torch.equal(labels[chosen], ids[chosen])
    masked = (inputs[chosen] == 1).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    assert masked == pytest.approx(0.8, abs=0.01) and kept == pytest.approx(0.1, abs=0.01)
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.01)  # random replacements
    assert torch.equal(inputs[~chosen], ids[~chosen])


def tiny(causal: bool) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny-llama", vocab_size=16, max_seq_len=32,
                                             n_layer=2, d_model=32, causal=causal))


@pytest.mark.parametrize("causal", [True, False])
def test_loss_falls_on_a_repeated_pattern(causal):
    model = tiny(causal)
    seq = torch.tensor([[3, 7, 1, 9, 4, 2] * 4]).repeat(4, 1)  # (4, 24)
    x, y = seq[:, :-1], seq[:, 1:]
    objective = causal_lm if causal else masked_lm(mask_id=15, vocab_size=16, probability=0.3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = objective(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])


def test_mask_id_from_tokenizer_or_config():
    class Vocab:
        def token_to_id(self, token):
            return {"<mask>": 4}.get(token)

    assert find_mask_id(Vocab(), None) == 4 and find_mask_id(Vocab(), 9) == 9
    with pytest.raises(ConfigError, match="set train.mask_token_id"):
        find_mask_id(None, None)


def test_activation_checkpointing_keeps_the_gradients():
    x = torch.tensor([[3, 7, 1, 9, 4, 2, 5, 8]])
    grads = []
    for recompute in (False, True):
        model = tiny(causal=True)
        model.checkpoint_blocks = recompute
        causal_lm(model, x[:, :-1], x[:, 1:]).backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed)
