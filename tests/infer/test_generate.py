"""Token loop: greedy = argmax of full forwards, batching changes nothing, every way to end, errors."""

from __future__ import annotations

import pytest
import torch

from pagoda.errors import ContextLengthError, InvalidRequestError
from pagoda.infer.generate import Timings, TokenEvent, check_request, generate_tokens
from pagoda.infer.sampling import SamplingParams
from pagoda.model.config import ModelConfig
from pagoda.model.transformer import Transformer


def tiny_model(max_seq_len: int = 256, seed: int = 0) -> Transformer:
    """A random tiny Llama; a wide init makes next-token distributions peaked (no near ties)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny-llama", max_seq_len=max_seq_len, init_std=0.3)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model()


def prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (n,), generator=g).tolist()


def run(model, prompts, params, **kwargs) -> dict[int, list[TokenEvent]]:
    """All events per sequence index, checking each step carries at most one event per index."""
    out: dict[int, list[TokenEvent]] = {i: [] for i in range(len(prompts))}
    for step in generate_tokens(model, prompts, params, **kwargs):
        indices = [e.index for e in step]
        assert len(indices) == len(set(indices))
        for event in step:
            assert not out[event.index] or out[event.index][-1].finish_reason is None
            out[event.index].append(event)
    return out


def tokens(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events]


@torch.inference_mode()
def reference_greedy(model: Transformer, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence every step: no KV cache, no kernels."""
    seq, out = list(ids), []
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0, -1]  # (vocab,)
        out.append(int(logits.argmax()))
        seq.append(out[-1])
    return out


@pytest.mark.parametrize("length", [1, 5, 17])
def test_greedy_matches_full_forward_argmax(model, length):
    ids = prompt(length, seed=length)
    expected = reference_greedy(model, ids, 12)
    events = run(model, [ids], [SamplingParams(temperature=0, max_tokens=12)])[0]
    assert tokens(events) == expected
    assert [e.finish_reason for e in events] == [None] * 11 + ["length"]


def test_greedy_matches_full_forward_for_other_switches():
    # learned positions, LayerNorm, GELU, biases (GPT-2 style); a sliding window shorter than
    # the sequence (Mistral style), also with left padding in a batch
    torch.manual_seed(1)
    gpt2 = Transformer(ModelConfig.from_name(
        "tiny-llama", pos_encoding="learned", norm="layernorm", activation="gelu",
        gated_ffn=False, attn_qkv_bias=True, attn_out_bias=True, ffn_bias=True, init_std=0.3,
        max_seq_len=64)).eval()
    torch.manual_seed(2)
    windowed = Transformer(ModelConfig.from_name(
        "tiny-llama", sliding_window=6, init_std=0.3, max_seq_len=64)).eval()
    for m in (gpt2, windowed):
        prompts = [prompt(9, seed=3), prompt(4, seed=4)]
        params = [SamplingParams(temperature=0, max_tokens=10)] * 2
        batched = run(m, prompts, params)
        for i, ids in enumerate(prompts):
            assert tokens(batched[i]) == reference_greedy(m, ids, 10), (m.cfg.name, i)


@pytest.mark.parametrize(
    "make_params",
    [
        lambda i: SamplingParams(temperature=0, max_tokens=10),
        lambda i: SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=10),
        lambda i: SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.3,
                                 seed=7 * i, max_tokens=10),
    ],
    ids=["greedy", "seeded-top-p", "seeded-top-k-penalty"],
)
def test_batch_of_different_lengths_equals_each_alone(model, make_params):
    prompts = [prompt(3, 1), prompt(11, 2), prompt(1, 3), prompt(7, 4)]
    batched = run(model, prompts, [make_params(i) for i in range(len(prompts))])
    for i, ids in enumerate(prompts):
        alone = run(model, [ids], [make_params(i)])[0]
        assert tokens(batched[i]) == tokens(alone), f"prompt {i}"
        assert batched[i][-1].finish_reason == alone[-1].finish_reason == "length"


def test_batch_with_different_budgets_near_the_context_limit():
    # Each request fits the context alone; the batch must too, although left padding makes
    # the short prompt's slots start late (longest prompt + largest budget > context).
    model = tiny_model(max_seq_len=32, seed=4)
    prompts = [prompt(12, 5), prompt(2, 6)]
    params = [SamplingParams(temperature=0, max_tokens=20),
              SamplingParams(temperature=0, max_tokens=30)]
    batched = run(model, prompts, params)
    for i, ids in enumerate(prompts):
        assert tokens(batched[i]) == reference_greedy(model, ids, params[i].max_tokens)
    # max_tokens=None generates until the context is full, batched or not
    params = [SamplingParams(temperature=0, ignore_eos=True)] * 2
    batched = run(model, prompts, params)
    assert [len(batched[i]) for i in range(2)] == [32 - 12, 32 - 2]
    assert tokens(batched[1]) == reference_greedy(model, prompts[1], 30)


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    ids = prompt(5, 9)

    def draw(seed):
        params = SamplingParams(temperature=1.5, seed=seed, max_tokens=12)
        return tokens(run(model, [ids], [params])[0])

    assert draw(1) == draw(1)
    assert len({tuple(draw(s)) for s in range(5)}) > 1


def test_eos_stops_and_ignore_eos_continues(model):
    ids = prompt(6, 11)
    free = tokens(run(model, [ids], [SamplingParams(temperature=0, max_tokens=8)])[0])
    eos = free[3]
    first = free.index(eos)  # the token may also appear earlier
    stopped = run(model, [ids], [SamplingParams(temperature=0, max_tokens=8)],
                  eos_ids=frozenset({eos}))[0]
    assert tokens(stopped) == free[: first + 1]  # the EOS token itself is reported
    assert stopped[-1].finish_reason == "stop"
    ignored = run(model, [ids], [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)],
                  eos_ids=frozenset({eos}))[0]
    assert tokens(ignored) == free and ignored[-1].finish_reason == "length"
    # stop_token_ids end a sequence even with ignore_eos
    by_stop_id = run(model, [ids], [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                   stop_token_ids=[eos])])[0]
    assert tokens(by_stop_id) == free[: first + 1] and by_stop_id[-1].finish_reason == "stop"


def test_one_sequence_stopping_does_not_disturb_the_others(model):
    prompts = [prompt(4, 12), prompt(9, 13)]
    free = [tokens(run(model, [p], [SamplingParams(temperature=0, max_tokens=8)])[0])
            for p in prompts]
    stop_id = free[0][1]
    params = [SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_id]),
              SamplingParams(temperature=0, max_tokens=8)]
    batched = run(model, prompts, params)
    assert tokens(batched[0]) == free[0][: free[0].index(stop_id) + 1]
    assert batched[0][-1].finish_reason == "stop"
    assert tokens(batched[1]) == free[1]


def test_cancelled_sequence_ends_and_the_rest_continue(model):
    prompts = [prompt(4, 14), prompt(6, 15)]
    params = [SamplingParams(temperature=0, max_tokens=10)] * 2
    cancelled: set[int] = set()
    counts = [0, 0]
    steps = 0
    for step in generate_tokens(model, prompts, params, cancelled=cancelled):
        steps += 1
        for event in step:
            counts[event.index] += 1
        if steps == 3:
            cancelled.add(0)
    assert counts == [3, 10]
    alone = tokens(run(model, [prompts[1]], [params[1]])[0])
    cancelled_all: set[int] = set()
    seen = []
    for step in generate_tokens(model, prompts, params, cancelled=cancelled_all):
        seen.append(step)
        cancelled_all.update({0, 1})
    assert len(seen) == 1  # cancelling everything ends the generator
    assert seen[0][1].token_id == alone[0]


def test_logprobs_are_raw_distribution(model):
    ids = prompt(5, 16)
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    events = run(model, [ids], [params])[0]
    with torch.inference_mode():
        logp = model(torch.tensor([ids]))[0, -1].log_softmax(-1)
    first = events[0]
    assert first.logprob == pytest.approx(float(logp.max()), abs=1e-4)
    assert [t for t, _ in first.top_logprobs] == logp.topk(3).indices.tolist()
    for event in events:
        assert event.logprob <= 0 and len(event.top_logprobs) == 3
        assert event.top_logprobs[0][0] == event.token_id  # greedy picks the top one
    plain = run(model, [ids], [SamplingParams(temperature=0, max_tokens=2)])[0]
    assert plain[0].logprob is None and plain[0].top_logprobs == []


def test_timings_are_filled(model):
    timings = Timings()
    prompts = [prompt(8, 17), prompt(3, 18)]
    run(model, prompts, [SamplingParams(temperature=0, max_tokens=6)] * 2, timings=timings)
    assert timings.prefill_tokens == 11
    assert timings.decode_tokens == 2 * 5  # tokens fed back; the last ones never are
    assert timings.prefill_s > 0 and timings.decode_s > 0
    assert timings.prefill_tok_s > 0 and timings.decode_tok_s > 0
    d = timings.to_dict()
    assert set(d) == {"prefill_s", "decode_s", "prefill_tok_s", "decode_tok_s"}
    assert all(v > 0 for v in d.values())
    assert Timings().to_dict() == {"prefill_s": 0, "decode_s": 0, "prefill_tok_s": 0,
                                   "decode_tok_s": 0}


def first_step(model, prompts, params):
    return next(generate_tokens(model, prompts, params))


def test_request_errors(model):
    ok = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(InvalidRequestError, match="empty"):
        first_step(model, [[]], [ok])
    with pytest.raises(InvalidRequestError, match="empty"):
        first_step(model, [prompt(3), []], [ok, ok])
    with pytest.raises(InvalidRequestError, match="no prompts"):
        first_step(model, [], [])
    with pytest.raises(ContextLengthError) as error:
        first_step(model, [prompt(300)], [ok])
    assert "300" in str(error.value) and "256" in str(error.value)
    with pytest.raises(ContextLengthError) as error:
        first_step(model, [prompt(256)], [SamplingParams(temperature=0)])  # no room to generate
    assert "256" in str(error.value)
    with pytest.raises(ContextLengthError) as error:
        first_step(model, [prompt(250)], [SamplingParams(max_tokens=7)])
    message = str(error.value)
    assert "250" in message and "7" in message and "256" in message and "at most 6" in message
    # exactly filling the context is fine
    events = run(model, [prompt(250)], [SamplingParams(temperature=0, max_tokens=6)])[0]
    assert len(events) == 6 and events[-1].finish_reason == "length"


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -1.0), ("top_p", 1.5), ("top_p", 0.0), ("top_k", -1), ("min_p", 2.0),
     ("max_tokens", 0), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
     ("top_logprobs", 5), ("stop", [""]), ("temperature", float("nan"))],
)
def test_invalid_sampling_values(model, field, value):
    params = SamplingParams(temperature=0, max_tokens=4)
    setattr(params, field, value)
    with pytest.raises(InvalidRequestError, match=field):
        first_step(model, [prompt(3)], [params])


def test_check_request_budget():
    assert check_request(10, SamplingParams(max_tokens=5), 32) == 5
    assert check_request(10, SamplingParams(), 32) == 22
    assert check_request(31, SamplingParams(max_tokens=1), 32) == 1
