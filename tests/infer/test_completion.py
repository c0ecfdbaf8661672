"""Text generation on the real SmolLM2: stop strings, seeds, logprobs, UTF-8 safe streaming."""

from __future__ import annotations

import pytest

from pagoda.infer.completion import Completion, complete, stream_text
from pagoda.infer.generate import Timings
from pagoda.infer.sampling import SamplingParams
from pagoda.tokenizer import render_chat

pytestmark = pytest.mark.real_model

REPLACEMENT = "\ufffd"


def chat_ids(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return tokenizer.encode(render_chat(tokenizer, messages), add_special_tokens=False)


def deltas_by_index(model, tokenizer, prompts, params) -> dict[int, list]:
    out: dict[int, list] = {i: [] for i in range(len(prompts))}
    for delta in stream_text(model, tokenizer, prompts, params):
        assert not out[delta.index] or out[delta.index][-1].finish_reason is None
        out[delta.index].append(delta)
    return out


def one(smol, ids: list[int], **params) -> Completion:
    done, _ = complete(smol.model, smol.tokenizer, [ids], [SamplingParams(**params)])
    return done[0]


def test_greedy_chat_answer_knows_the_capital_of_france(smol):
    ids = chat_ids(smol.tokenizer, "What is the capital of France?")
    answer = one(smol, ids, temperature=0, max_tokens=24)
    assert "Paris" in answer.text
    assert answer.prompt_tokens == len(ids)
    if answer.finish_reason == "stop":  # ended its turn: the last token is an end-of-turn id
        assert answer.token_ids[-1] in smol.tokenizer.eos_ids


def test_deltas_concatenate_to_the_decoded_tokens_utf8_safe(smol):
    tok = smol.tokenizer
    prompts = [
        tok.encode("中文：你好世界。中文：你好"),
        chat_ids(tok, "Repeat exactly: 🎉🌞🍉 你好世界"),
        tok.encode("🎉🎉🎉 Party time! 🎉🎉"),
        tok.encode("The capital of France is"),
    ]
    params = [SamplingParams(temperature=0, max_tokens=20),
              SamplingParams(temperature=0, max_tokens=20),
              SamplingParams(temperature=1.0, seed=1, max_tokens=20),
              SamplingParams(temperature=0.8, seed=2, max_tokens=20)]
    split_chars = 0
    for i, deltas in deltas_by_index(smol.model, tok, prompts, params).items():
        ids = [d.token.token_id for d in deltas]
        text = "".join(d.text for d in deltas)
        full = tok.decode(ids, skip_special_tokens=True)
        assert text == full, f"prompt {i}"
        # a character split over byte tokens is held back until complete; only a stream cut
        # off mid-character (finish "length") may end in a replacement character
        for d in deltas[:-1]:
            assert REPLACEMENT not in d.text, f"prompt {i}: {d.text!r}"
        assert REPLACEMENT not in deltas[-1].text.rstrip(REPLACEMENT)
        assert full.endswith(REPLACEMENT) == deltas[-1].text.endswith(REPLACEMENT)
        split_chars += sum(REPLACEMENT in tok.decode([t]) for t in ids)
        assert deltas[-1].finish_reason in ("stop", "length")
        assert all(d.finish_reason is None for d in deltas[:-1])
    assert split_chars > 0  # the prompts did make the model emit partial UTF-8 tokens


def test_stop_strings_cut_the_text(smol):
    ids = smol.tokenizer.encode("The capital of France is")
    free = one(smol, ids, temperature=0, max_tokens=16)
    words = free.text.split()
    assert free.finish_reason == "length" and len(words) >= 3
    stop = words[1]  # a piece of text after the first word
    cut = free.text.find(stop)
    stopped = one(smol, ids, temperature=0, max_tokens=16, stop=[stop])
    assert stopped.text == free.text[:cut]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    assert len(stopped.token_ids) < len(free.token_ids)
    # the earliest of several stop strings wins; a stop string never produced changes nothing
    last = words[-2]
    both = one(smol, ids, temperature=0, max_tokens=16, stop=[last, stop, "zzzq"])
    assert both.text == free.text[: min(cut, free.text.find(last))]
    never = one(smol, ids, temperature=0, max_tokens=16, stop=["zzzq"])
    assert (never.text, never.finish_reason) == (free.text, "length")
    # a stop string that spans several tokens
    span = free.text[1:9]
    assert len(smol.tokenizer.encode(span)) > 1
    spanned = one(smol, ids, temperature=0, max_tokens=16, stop=[span])
    assert (spanned.text, spanned.finish_reason) == (free.text[:1], "stop")


def test_stop_string_ends_only_its_own_sequence_in_a_batch(smol):
    tok = smol.tokenizer
    prompts = [tok.encode("The capital of France is"), tok.encode("One, two, three,")]
    free, _ = complete(smol.model, tok, prompts, [SamplingParams(temperature=0, max_tokens=10)] * 2)
    stop = free[0].text.split()[0]
    params = [SamplingParams(temperature=0, max_tokens=10, stop=[stop]),
              SamplingParams(temperature=0, max_tokens=10)]
    done, timings = complete(smol.model, tok, prompts, params)
    assert done[0].text == free[0].text[: free[0].text.find(stop)]
    assert done[0].finish_reason == "stop"
    assert (done[1].text, done[1].token_ids) == (free[1].text, free[1].token_ids)
    assert timings.prefill_tokens == sum(map(len, prompts))


def test_seed_reproducibility(smol):
    ids = chat_ids(smol.tokenizer, "Tell me a story about a cat.")

    def draw(seed: int) -> str:
        return one(smol, ids, temperature=1.0, seed=seed, max_tokens=10).text

    assert draw(7) == draw(7)
    assert len({draw(seed) for seed in range(4)}) > 1
    # a seeded sequence draws the same tokens whatever it is batched with
    other = smol.tokenizer.encode("Hello")
    batched, _ = complete(smol.model, smol.tokenizer, [other, ids],
                          [SamplingParams(temperature=1.0, seed=3, max_tokens=10),
                           SamplingParams(temperature=1.0, seed=7, max_tokens=10)])
    assert batched[1].text == draw(7)


def test_logprobs_and_top_logprobs(smol):
    ids = chat_ids(smol.tokenizer, "Name a colour.")
    c = one(smol, ids, temperature=0.7, seed=0, max_tokens=8, logprobs=True, top_logprobs=5)
    assert len(c.logprobs) == len(c.top_logprobs) == len(c.token_ids) > 0
    for token, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs, strict=True):
        assert lp is not None and lp <= 0
        assert len(top) == 5
        values = [v for _, v in top]
        assert all(v <= 0 for v in values) and values == sorted(values, reverse=True)
        assert lp <= values[0] + 1e-5
        if token in dict(top):
            assert dict(top)[token] == pytest.approx(lp, abs=1e-5)
    greedy = one(smol, ids, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2)
    assert [top[0][0] for top in greedy.top_logprobs] == greedy.token_ids
    plain = one(smol, ids, temperature=0, max_tokens=2)
    assert plain.logprobs == [None, None] and plain.top_logprobs == [[], []]


def test_stream_text_fills_timings(smol):
    timings = Timings()
    ids = smol.tokenizer.encode("Once upon a time")
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)]
    deltas = list(stream_text(smol.model, smol.tokenizer, [ids], params, timings))
    assert len(deltas) == 5 and deltas[-1].finish_reason == "length"
    assert timings.prefill_tokens == len(ids) and timings.decode_tokens == 4
    assert min(timings.to_dict().values()) > 0
