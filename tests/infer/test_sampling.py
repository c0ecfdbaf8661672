"""Sampler: truncation keeps the right candidates, penalties follow their formulas, seeds hold."""

import math

import pytest
import torch

from pagoda.errors import InvalidRequestError
from pagoda.infer.sampling import (
    SampleResult,
    SamplingParams,
    SequenceSamplingState,
    apply_penalties,
    sample,
)


def _draw(logits_row: torch.Tensor, params: SamplingParams, n: int = 4000) -> torch.Tensor:
    """Sample one row n times (as a batch of n unseeded rows); return the tokens [n]."""
    torch.manual_seed(0)
    logits = logits_row.expand(n, -1).clone()
    states = [SequenceSamplingState([]) for _ in range(n)]
    return torch.tensor(sample(logits, [params] * n, states).token_ids)


def _support(logits_row: torch.Tensor, params: SamplingParams) -> set[int]:
    return set(_draw(logits_row, params).tolist())


def _from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_top_k_keeps_exactly_k_most_likely():
    logits = torch.linspace(0.0, 1.0, 10)  # token 9 most likely; nearly flat
    assert _support(logits, SamplingParams(top_k=3)) == {7, 8, 9}
    assert _support(logits, SamplingParams(top_k=1)) == {9}
    assert _support(logits, SamplingParams(top_k=50)) == set(range(10))  # k > V keeps all


@pytest.mark.parametrize(
    ("top_p", "nucleus"),
    [(0.5, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (0.99, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_minimal_nucleus(top_p: float, nucleus: set[int]):
    logits = _from_probs([0.5, 0.3, 0.15, 0.05])
    assert _support(logits, SamplingParams(top_p=top_p)) == nucleus


def test_top_p_renormalizes_the_nucleus():
    tokens = _draw(_from_probs([0.5, 0.3, 0.15, 0.05]), SamplingParams(top_p=0.75), n=8000)
    assert (tokens == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.02)


@pytest.mark.parametrize(("min_p", "kept"), [(0.2, {0, 1, 2}), (0.6, {0, 1}), (1.0, {0})])
def test_min_p_threshold_is_relative_to_top_token(min_p: float, kept: set[int]):
    # thresholds: 0.2 * 0.4 = 0.08 drops 0.06 and 0.04; 0.6 * 0.4 = 0.24 also drops 0.2
    logits = _from_probs([0.4, 0.3, 0.2, 0.06, 0.04])
    assert _support(logits, SamplingParams(min_p=min_p)) == kept


def test_truncations_combine():
    logits = _from_probs([0.4, 0.3, 0.2, 0.06, 0.04])
    # top-k 4 then top-p 0.65 of the renormalized (0.4, 0.3, ...)/0.96 -> {0, 1}
    assert _support(logits, SamplingParams(top_k=4, top_p=0.65)) == {0, 1}


def test_rows_in_one_batch_keep_their_own_truncation():
    logits = _from_probs([0.4, 0.3, 0.2, 0.06, 0.04])
    kinds = [SamplingParams(top_k=2), SamplingParams(min_p=0.6), SamplingParams(top_p=0.65)]
    torch.manual_seed(0)
    n = 1000
    states = [SequenceSamplingState([]) for _ in range(3 * n)]
    tokens = sample(logits.expand(3 * n, -1), kinds * n, states).token_ids
    assert [set(tokens[i::3]) for i in range(3)] == [{0, 1}, {0, 1}, {0, 1}]
    plain = sample(logits.expand(n, -1), [SamplingParams()] * n, states[:n]).token_ids
    assert set(plain) == {0, 1, 2, 3, 4}


def test_top_p_nucleus_wider_than_first_window():
    vocab, top_p = 3000, 0.8
    logits = torch.linspace(0.0, -3.0, vocab)  # token id == rank
    probs = logits.softmax(-1)
    nucleus = int((probs.cumsum(-1) - probs < top_p).sum())  # reference from a full sort
    assert nucleus > 1024  # the sampler's first guess must widen to find it
    drawn = _draw(logits, SamplingParams(top_p=top_p))
    assert nucleus - 100 < drawn.max().item() < nucleus


def test_top_p_applies_to_the_renormalized_top_k():
    logits = _from_probs([0.5, 0.2, 0.15, 0.15])
    # after top-k 2 the masses are 0.71 and 0.29, so a 0.6 nucleus is the top token alone
    assert _support(logits, SamplingParams(top_k=2, top_p=0.6)) == {0}


def test_min_p_row_is_not_narrowed_by_a_top_k_neighbour():
    n = 1000
    logits = torch.zeros(2 * n, 100)  # uniform: min-p keeps all 100, top-k exactly 5
    params = [SamplingParams(top_k=5), SamplingParams(min_p=0.5)] * n
    torch.manual_seed(0)
    tokens = sample(logits, params, [SequenceSamplingState([]) for _ in params]).token_ids
    assert len(set(tokens[0::2])) == 5
    assert len(set(tokens[1::2])) > 90


def test_temperature_scales_the_distribution():
    logits = _from_probs([0.6, 0.3, 0.1])
    tokens = _draw(logits, SamplingParams(temperature=0.5), n=8000)
    expected = (logits / 0.5).softmax(-1)
    observed = torch.bincount(tokens, minlength=3).float() / len(tokens)
    torch.testing.assert_close(observed, expected, atol=0.02, rtol=0)


def test_low_temperature_matches_greedy():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 1000, generator=gen) * 3
    states = [SequenceSamplingState([], seed=i) for i in range(16)]
    cold = sample(logits, [SamplingParams(temperature=1e-4)] * 16, states)
    greedy = sample(logits, [SamplingParams(temperature=0)] * 16, states)
    assert cold.token_ids == greedy.token_ids == logits.argmax(-1).tolist()


def test_penalties_change_exactly_the_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0, 3.0]])
    state = SequenceSamplingState(prompt_token_ids=[0, 1, 1])
    for tok in (2, 2, 3):
        state.append(tok)
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(logits, [params], [state])
    # repetition over prompt+output {0,1,2,3}: positive / 2, negative * 2
    # then output counts {2: 2, 3: 1}: minus 0.5 * count + 0.25
    expected = torch.tensor([[1.0, -2.0, 0.25 - 1.25, -1.0 - 0.75, 1.0, 3.0]])
    torch.testing.assert_close(out, expected)
    assert logits[0, 0].item() == 2.0  # the caller's logits are not modified


def test_frequency_and_presence_ignore_the_prompt():
    logits = torch.zeros(1, 4)
    state = SequenceSamplingState(prompt_token_ids=[0, 1])
    state.append(3)
    out = apply_penalties(
        logits, [SamplingParams(frequency_penalty=1.0, presence_penalty=-0.5)], [state]
    )
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.0, -0.5]]))


def test_penalties_touch_only_rows_that_ask():
    logits = torch.ones(3, 5)
    states = [SequenceSamplingState([0, 1]) for _ in range(3)]
    params = [SamplingParams(), SamplingParams(repetition_penalty=4.0), SamplingParams()]
    out = apply_penalties(logits, params, states)
    torch.testing.assert_close(out[1], torch.tensor([0.25, 0.25, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(out[[0, 2]], logits[[0, 2]])


def test_greedy_is_argmax_after_penalties():
    logits = torch.tensor([[2.0, 1.5, 0.0], [2.0, 1.5, 0.0]])
    states = [SequenceSamplingState([0]), SequenceSamplingState([0])]
    params = [SamplingParams(temperature=0, repetition_penalty=2.0), SamplingParams(temperature=0)]
    assert sample(logits, params, states).token_ids == [1, 0]


def test_mixed_batch_puts_each_row_in_its_place():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 500, generator=gen)
    # drawn rows with top_k=1 are deterministic too, so every row must be its own argmax
    params = [SamplingParams(temperature=0 if i % 2 else 1.5, top_k=1) for i in range(6)]
    states = [SequenceSamplingState([], seed=i) for i in range(6)]
    assert sample(logits, params, states).token_ids == logits.argmax(-1).tolist()


def _generate(params: SamplingParams, prompt: list[int], steps: int = 12) -> list[int]:
    """Run one sequence alone; step logits come from a fixed generator."""
    logits_gen = torch.Generator().manual_seed(3)
    state = SequenceSamplingState(prompt, params.seed)
    out = []
    for _ in range(steps):
        logits = torch.randn(1, 1000, generator=logits_gen)
        tok = sample(logits, [params], [state]).token_ids[0]
        state.append(tok)
        out.append(tok)
    return out


def test_same_seed_same_tokens():
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    assert _generate(params, [1]) == _generate(params, [1])
    assert _generate(params, [1]) != _generate(SamplingParams(top_p=0.95, seed=4321), [1])


def test_seeded_row_is_independent_of_batch_composition():
    target = SamplingParams(temperature=0.8, top_k=50, repetition_penalty=1.2, seed=7)
    batch = [
        SamplingParams(temperature=0),
        SamplingParams(top_p=0.5),  # unseeded: draws from the global generator
        target,
        SamplingParams(min_p=0.1, seed=99, frequency_penalty=1.0),
    ]
    states = [SequenceSamplingState([5], p.seed) for p in batch]
    logits_gen = torch.Generator().manual_seed(3)  # same target logits as the lone run
    others_gen = torch.Generator().manual_seed(42)
    together = []
    for _ in range(12):
        logits = torch.randn(len(batch), 1000, generator=others_gen)
        logits[2] = torch.randn(1000, generator=logits_gen)
        result = sample(logits, batch, states)
        for state, tok in zip(states, result.token_ids, strict=True):
            state.append(tok)
        together.append(result.token_ids[2])
    assert together == _generate(target, [5])


def test_logprobs_come_from_the_raw_distribution():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 20, generator=gen)
    params = [
        SamplingParams(
            temperature=0.7, top_k=3, repetition_penalty=1.5, logprobs=True, top_logprobs=20
        ),
        SamplingParams(logprobs=False),
        SamplingParams(temperature=0, logprobs=True, top_logprobs=2),
    ]
    states = [SequenceSamplingState([0, 1], seed=i) for i in range(3)]
    result = sample(logits, params, states)
    raw = logits.log_softmax(-1)

    for row in (0, 2):
        assert result.logprobs[row] == pytest.approx(raw[row, result.token_ids[row]].item())
    full = result.top_logprobs[0]
    assert sorted(t for t, _ in full) == list(range(20))
    assert sum(math.exp(lp) for _, lp in full) == pytest.approx(1.0, abs=1e-5)
    assert [lp for _, lp in full] == sorted((lp for _, lp in full), reverse=True)
    best, best_ids = raw[2].topk(2)
    assert [t for t, _ in result.top_logprobs[2]] == best_ids.tolist()
    assert [lp for _, lp in result.top_logprobs[2]] == pytest.approx(best.tolist())
    assert result.logprobs[1] is None and result.top_logprobs[1] == []


def test_all_greedy_fast_path():
    logits = torch.randn(4, 100)
    result = sample(
        logits, [SamplingParams(temperature=0)] * 4, [SequenceSamplingState([]) for _ in range(4)]
    )
    assert result == SampleResult(logits.argmax(-1).tolist(), [None] * 4, [[], [], [], []])


def test_rows_must_match_params_and_states():
    with pytest.raises(ValueError, match="2 logit rows"):
        sample(torch.zeros(2, 5), [SamplingParams()], [SequenceSamplingState([])])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.1),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.1),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -3.0),
        ("seed", 1.5),
        ("seed", 2**64),
        ("max_tokens", 0),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
        ("stop", [""]),
        ("stop", ["x"] * 17),
        ("stop_token_ids", [-1]),
    ],
)
def test_validate_names_the_bad_field(field: str, value: object):
    params = SamplingParams(logprobs=True, **{field: value})  # construction never raises
    with pytest.raises(InvalidRequestError, match=field) as err:
        params.validate()
    assert "\n" not in str(err.value)


def test_top_logprobs_needs_logprobs():
    with pytest.raises(InvalidRequestError, match="logprobs"):
        SamplingParams(top_logprobs=5).validate()


def test_valid_params_pass():
    params = SamplingParams(
        temperature=0,
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=-2,
        frequency_penalty=2,
        seed=-1,
        max_tokens=1,
        stop=["x"] * 16,
        stop_token_ids=[0],
        logprobs=True,
        top_logprobs=20,
    )
    assert params.validated() is params
    SamplingParams().validate()
