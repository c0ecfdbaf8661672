"""Feed-forward blocks: plain and gated FFNs, and the mixture of experts with its balancing loss."""

import pytest
import torch
import torch.nn.functional as F

from pagoda.model.config import ModelConfig
from pagoda.model.ffn import FeedForward, MixtureOfExperts, build_ffn


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"d_model": 8, "n_head": 2, "d_ff": 16, **kw})


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.5)


def test_swiglu():
    ffn = FeedForward(cfg(activation="silu", gated_ffn=True))
    randomise(ffn)
    x = torch.randn(2, 3, 8)
    expected = ffn.down_proj(F.silu(ffn.gate_proj(x)) * ffn.up_proj(x))
    torch.testing.assert_close(ffn(x), expected)
    assert ffn.up_proj.bias is None


@pytest.mark.parametrize("activation, fn", [
    ("relu", F.relu),
    ("gelu", F.gelu),
    ("gelu_tanh", lambda t: 0.5 * t * (1 + torch.tanh((2 / torch.pi) ** 0.5
                                                       * (t + 0.044715 * t ** 3)))),
])
def test_plain_ffn_with_biases(activation, fn):
    ffn = FeedForward(cfg(activation=activation, gated_ffn=False, ffn_bias=True))
    randomise(ffn)
    assert ffn.gate_proj is None and ffn.up_proj.bias is not None
    x = torch.randn(4, 8)
    expected = ffn.down_proj(fn(ffn.up_proj(x)))
    torch.testing.assert_close(ffn(x), expected, rtol=1e-5, atol=1e-5)


def test_build_ffn_switch():
    assert isinstance(build_ffn(cfg()), FeedForward)
    moe = build_ffn(cfg(n_experts=3, n_experts_per_token=2))
    assert isinstance(moe, MixtureOfExperts) and len(moe.experts) == 3 and moe.top_k == 2


def test_moe_equals_a_hand_computed_mixture():
    moe = MixtureOfExperts(cfg(n_experts=3, n_experts_per_token=2))
    randomise(moe)
    x = torch.randn(1, 5, 8)
    out = moe(x)
    for t in range(5):
        token = x[0, t]
        probs = (moe.router.weight @ token).softmax(-1)  # (3,)
        top = sorted(range(3), key=lambda e: -probs[e].item())[:2]
        mix = sum(probs[e] / (probs[top[0]] + probs[top[1]]) * moe.experts[e](token) for e in top)
        torch.testing.assert_close(out[0, t], mix, rtol=1e-5, atol=1e-6)


def test_router_sends_each_token_to_its_top_k_experts():
    moe = MixtureOfExperts(cfg(n_experts=4, n_experts_per_token=1))
    randomise(moe)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 10.0  # feature 0 votes for expert 2
        moe.router.weight[3, 1] = 10.0  # feature 1 for expert 3
    for e, expert in enumerate(moe.experts):  # expert e outputs e everywhere
        with torch.no_grad():
            expert.down_proj.weight.zero_()
        expert.down_proj.bias = torch.nn.Parameter(torch.full((8,), float(e)))
    x = torch.zeros(1, 2, 8)
    x[0, 0, 0], x[0, 1, 1] = 1.0, 1.0
    out = moe(x)
    torch.testing.assert_close(out[0, 0], torch.full((8,), 2.0))
    torch.testing.assert_close(out[0, 1], torch.full((8,), 3.0))


def two_expert_moe() -> MixtureOfExperts:
    moe = MixtureOfExperts(cfg(n_experts=2, n_experts_per_token=1))
    randomise(moe)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0], moe.router.weight[1, 0] = 1.0, -1.0
    return moe


def test_aux_loss_is_one_for_perfectly_balanced_routing():
    moe = two_expert_moe()
    x = torch.zeros(1, 4, 8)
    x[0, :2, 0], x[0, 2:, 0] = 1.0, -1.0  # half the tokens to each expert, mirrored probs
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_aux_loss_grows_when_routing_is_imbalanced():
    moe = two_expert_moe()
    x = torch.zeros(1, 4, 8)
    x[0, :, 0] = 1.0  # every token to expert 0, which has probability sigmoid(2)
    moe(x)
    p = torch.sigmoid(torch.tensor(2.0)).item()
    assert moe.aux_loss.item() == pytest.approx(2 * p, abs=1e-6)  # n_experts * (1 * p)
    assert moe.aux_loss.item() > 1.5


def test_uniform_router_gives_aux_loss_one():
    moe = MixtureOfExperts(cfg(n_experts=4, n_experts_per_token=2))
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(2, 3, 8))
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_gradients_reach_the_router_through_the_mixture_and_the_aux_loss():
    moe = MixtureOfExperts(cfg(n_experts=4, n_experts_per_token=2))
    randomise(moe)
    x = torch.randn(2, 3, 8)
    moe(x).pow(2).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    moe.zero_grad()
    moe(x)
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_experts_that_receive_no_tokens_get_no_gradient_but_do_not_break():
    moe = two_expert_moe()
    x = torch.zeros(1, 3, 8)
    x[0, :, 0] = 1.0
    moe(x).sum().backward()
    assert moe.experts[0].up_proj.weight.grad is not None
    assert moe.experts[1].up_proj.weight.grad is None
