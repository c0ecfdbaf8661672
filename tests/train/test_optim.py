"""Weight-decay groups, LAMB and the learning-rate schedules."""

from __future__ import annotations

import pytest
import torch

from pagoda.model.config import ModelConfig
from pagoda.model.transformer import Transformer
from pagoda.train.config import OptimConfig, ScheduleConfig
from pagoda.train.optim import Lamb, build_optimizer, learning_rate, param_groups


def tiny_gpt2() -> Transformer:
    return Transformer(ModelConfig.from_name("baby-gpt", n_layer=2, d_model=32, n_head=2,
                                             d_ff=64, vocab_size=40, attn_qkv_bias=True,
                                             ffn_bias=True))


def test_only_matrices_decay():
    model = tiny_gpt2()
    decay, no_decay = param_groups(model, 0.1)
    ids = {id(p): name for name, p in model.named_parameters()}
    decayed = {ids[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {"embed.weight", "pos_embed.weight", "layers.0.attn.q_proj.weight",
            "layers.1.ffn.down_proj.weight"} <= decayed
    assert all(ids[id(p)].endswith("bias") or "norm" in ids[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_build_optimizer_adamw_and_lamb():
    model = tiny_gpt2()
    assert isinstance(build_optimizer(model, OptimConfig()), torch.optim.AdamW)
    assert isinstance(build_optimizer(model, OptimConfig(name="lamb")), Lamb)


def test_lamb_minimises_a_regression():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    w_true = torch.randn(8, 1)
    layer = torch.nn.Linear(8, 1)
    opt = Lamb(layer.parameters(), lr=0.05, weight_decay=0.0)
    losses = []
    for _ in range(60):
        loss = ((layer(x) - x @ w_true) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def lrs(kind: str, steps: int = 100, **schedule) -> list[float]:
    sched = ScheduleConfig(kind=kind, warmup_steps=10, min_lr=1e-4, **schedule)
    return [learning_rate(s, OptimConfig(lr=1e-3), sched, steps) for s in range(steps)]


def test_warmup_is_linear_to_the_peak():
    values = lrs("cosine")
    assert values[0] == pytest.approx(1e-3 / 11) and values[9] == pytest.approx(1e-3 * 10 / 11)
    assert values[10] == pytest.approx(1e-3)


def test_cosine_decays_monotonically_to_min_lr():
    values = lrs("cosine")[10:]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == pytest.approx(1e-4, rel=0.01)
    assert values[45] == pytest.approx((1e-3 + 1e-4) / 2, rel=0.01)  # halfway: the midpoint


def test_wsd_is_stable_then_decays_linearly():
    values = lrs("wsd", decay_fraction=0.2)
    assert values[10:80] == [1e-3] * 70
    decay = values[80:]
    steps = [a - b for a, b in zip(decay, decay[1:], strict=False)]
    assert all(s == pytest.approx(steps[0]) for s in steps)
    assert values[-1] == pytest.approx(1e-4)


def test_constant_after_warmup():
    assert lrs("constant")[10:] == [1e-3] * 90
