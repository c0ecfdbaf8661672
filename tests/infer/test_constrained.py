"""Constrained decoding: tiny vocabularies for the mechanics; the real SmolLM2-135M-Instruct for
JSON that parses and validates through both generation paths, greedy and sampled, without
disturbing unconstrained neighbours."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
import xgrammar as xgr
from tokenizers import pre_tokenizers

from pagoda.errors import InvalidRequestError
from pagoda.infer.completion import complete
from pagoda.infer.constrained import ConstraintFactory, _vocab_type
from pagoda.infer.engine import Engine
from pagoda.infer.sampling import SamplingParams
from pagoda.tokenizer import Tokenizer, render_chat

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
CAT = "Describe a cat as a short JSON object with its name, color and age."
PERSON_PROMPT = "Give me a JSON object describing a person with a name and an age."


def byte_level_tokenizer() -> Tokenizer:
    """GPT-2 style: every byte a printable character ('Ġ' a space); EOS id 0."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|endoftext|>", *alphabet, "Ġ{", '{"']
    return Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [], "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.eos_token_id": 0})


def sentencepiece_tokenizer() -> Tokenizer:
    """Llama-2 style: '▁' for spaces, <0xNN> byte fallback; EOS id 2."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)),
              "▁", "{", "}", '"', "a", ":", "▁{"]
    return Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * len(tokens),
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0})


@pytest.fixture(scope="module")
def tiny_factory() -> ConstraintFactory:
    return ConstraintFactory(byte_level_tokenizer())


@pytest.fixture(scope="module")
def factory(smol) -> ConstraintFactory:
    return ConstraintFactory.for_tokenizer(smol.tokenizer, smol.model.cfg.vocab_size)


def chat(smol, text: str) -> list[int]:
    tok = smol.tokenizer
    return tok.encode(render_chat(tok, [{"role": "user", "content": text}]))


# ------------------------------------------------------------- tiny vocabularies
@pytest.mark.parametrize("make", [byte_level_tokenizer, sentencepiece_tokenizer])
def test_vocab_type_matches_xgrammars_own_detection(make):
    tok = make()
    detected = xgr.TokenizerInfo._detect_metadata_from_hf(tok.backend.to_str())
    assert _vocab_type(tok) == (detected["vocab_type"], detected["add_prefix_space"])
    matcher = ConstraintFactory(tok).json_object().matcher()
    row = torch.zeros(tok.vocab_size)
    matcher.mask_logits(row)
    allowed = (row == 0).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([i]).lstrip().startswith("{") for i in allowed)


def test_byte_level_constraint_finishes_on_a_complete_object():
    tok = byte_level_tokenizer()
    matcher = ConstraintFactory(tok).json_object().matcher()
    for token in tok.encode('{"a": 1}'):
        assert not matcher.is_finished()
        matcher.accept(token)
    assert matcher.is_finished()
    with pytest.raises(RuntimeError, match="breaks the constraint"):
        ConstraintFactory(tok).json_object().matcher().accept(tok.encode("x")[0])


def test_finished_means_only_eos_may_follow(tiny_factory):
    matcher = tiny_factory.json_schema({"type": "integer"}).matcher()
    for token in byte_level_tokenizer().encode("12"):
        matcher.accept(token)
    assert not matcher.is_finished()  # "12" is complete, but "123" could still follow
    matcher.accept(0)  # EOS
    assert matcher.is_finished()


@pytest.mark.parametrize("schema, fragment", [
    ({"type": "nonsense"}, "Unsupported type"),
    ({"type": "object", "properties": 5}, "properties must be an object"),
    ({"$ref": "#/definitions/missing"}, "missing"),
    ({"type": "string", "pattern": "("}, "parenthesis"),
    ("not a schema", "must be a JSON object"),
])
def test_invalid_schema_is_one_readable_line(tiny_factory, schema, fragment):
    with pytest.raises(InvalidRequestError) as caught:
        tiny_factory.json_schema(schema)
    message = str(caught.value)
    assert fragment in message and "\n" not in message and ".cc:" not in message


def test_response_format_mapping(tiny_factory):
    factory = tiny_factory
    assert factory.for_response_format(None) is None
    assert factory.for_response_format({"type": "text"}) is None
    assert "json_object" in repr(factory.for_response_format({"type": "json_object"}))
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    assert factory.for_response_format(fmt) is not None
    for bad in ({"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "x"}},
                {"type": "yaml"}):
        with pytest.raises(InvalidRequestError):
            factory.for_response_format(bad)


# -------------------------------------------------------------------- real model
@pytest.mark.real_model
def test_factory_is_shared_per_tokenizer_and_caches_compiled_grammars(smol, factory):
    assert ConstraintFactory.for_tokenizer(smol.tokenizer, smol.model.cfg.vocab_size) is factory
    assert factory.json_schema(PERSON).compiled is not None
    assert "json_object" in repr(factory.json_object())


@pytest.mark.real_model
def test_mask_allows_grammar_tokens_only_and_never_padding_or_special_ids(smol):
    tok = smol.tokenizer
    vocab = tok.vocab_size + 40  # a model vocabulary padded past the tokenizer's
    matcher = ConstraintFactory(tok, vocab).json_object().matcher()
    logits = torch.zeros(3, vocab)
    matcher.mask_logits(logits[1])
    allowed = set((logits[1] == 0).nonzero().flatten().tolist())
    assert allowed and all(tok.decode([i]).startswith("{") for i in allowed)
    assert (logits[0] == 0).all() and (logits[2] == 0).all()  # other rows untouched
    for token in tok.encode('{"a": "'):
        matcher.accept(token)
    row = torch.zeros(vocab)
    matcher.mask_logits(row)
    allowed = set((row == 0).nonzero().flatten().tolist())
    assert len(allowed) > 10_000  # inside a string almost any text goes
    assert not allowed & (tok.special_ids | set(range(tok.vocab_size, vocab)))
    for token in tok.encode('cat"}'):
        matcher.accept(token)
    assert matcher.is_finished()
    row = torch.zeros(vocab)
    matcher.mask_logits(row)
    assert set((row == 0).nonzero().flatten().tolist()) == set(tok.eos_ids)  # only EOS is left


@pytest.mark.real_model
def test_json_object_greedy_and_sampled_always_parse(smol, factory):
    constraint = factory.json_object()  # one compiled constraint shared by every sequence
    params = [SamplingParams(temperature=0, max_tokens=64, constraint=constraint)] + [
        SamplingParams(temperature=t, seed=s, max_tokens=64, constraint=constraint)
        for t, s in [(0.7, 0), (0.7, 1), (1.0, 3)]
    ]
    prompt = chat(smol, CAT)
    done, _ = complete(smol.model, smol.tokenizer, [prompt] * len(params), params)
    assert done[0].finish_reason == "stop"
    for c in done:
        if c.finish_reason == "stop":  # "length": cut short, as OpenAI's JSON mode
            assert isinstance(json.loads(c.text), dict), c.text
        assert c.text.startswith("{")  # no ```json fence, no preamble
    assert sum(c.finish_reason == "stop" for c in done) >= 3


@pytest.fixture(scope="module")
def person_runs(smol, factory) -> list:
    """Completions of PERSON_PROMPT under the PERSON schema: greedy first, then sampled."""
    constraint = factory.json_schema(PERSON)
    settings = [(0, None), (0.5, 1), (0.8, 2), (1.0, 3), (1.0, 4), (1.3, 5)]
    params = [SamplingParams(temperature=t, seed=s, max_tokens=64, constraint=constraint)
              for t, s in settings]
    prompt = chat(smol, PERSON_PROMPT)
    return complete(smol.model, smol.tokenizer, [prompt] * len(params), params)[0]


@pytest.mark.real_model
def test_json_schema_validates_for_seeds_and_temperatures(smol, person_runs):
    for c in person_runs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)
        assert not set(c.token_ids) & smol.tokenizer.eos_ids  # ends on "}", EOS not spent


@pytest.mark.real_model
def test_greedy_under_a_constraint_is_the_argmax_of_the_masked_logits(smol, factory):
    model, tok = smol.model, smol.tokenizer
    constraint = factory.json_schema(PERSON)
    prompt = chat(smol, PERSON_PROMPT)
    params = SamplingParams(temperature=0, max_tokens=8, constraint=constraint,
                            logprobs=True, top_logprobs=5)
    done, _ = complete(model, tok, [prompt], [params])
    matcher, ids, expected = constraint.matcher(), list(prompt), []
    with torch.inference_mode():
        for _ in range(8):
            logits = model(torch.tensor([ids]))[0, -1].float()
            matcher.mask_logits(logits)
            expected.append(int(logits.argmax()))
            matcher.accept(expected[-1])
            ids.append(expected[-1])
    assert done[0].token_ids == expected
    first_allowed = {t for t, _ in done[0].top_logprobs[0]}
    assert first_allowed and all(tok.decode([t]).startswith("{") for t in first_allowed)
    assert all(lp > float("-inf") for top in done[0].top_logprobs for _, lp in top)


@pytest.mark.real_model
def test_a_complete_value_ends_the_sequence_even_with_ignore_eos(smol, factory):
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True,
                            constraint=factory.json_schema(PERSON))
    done, _ = complete(smol.model, smol.tokenizer, [chat(smol, PERSON_PROMPT)], [params])
    assert done[0].finish_reason == "stop" and done[0].text.endswith("}")
    jsonschema.validate(json.loads(done[0].text), PERSON)


def run_engine(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]
               ) -> dict[str, tuple[list[int], str | None]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    reasons: dict[str, str | None] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].append(out.token_id)
            reasons[out.request_id] = out.finish_reason
    return {rid: (tokens[rid], reasons[rid]) for rid in requests}


@pytest.mark.real_model
def test_engine_mixes_constrained_and_unconstrained_requests(smol, factory, person_runs):
    model, tok = smol.model, smol.tokenizer
    plain = {
        "plain-cat": (chat(smol, CAT), SamplingParams(temperature=0, max_tokens=16)),
        "plain-hi": (chat(smol, "Say hello in French."), SamplingParams(temperature=0,
                                                                         max_tokens=16)),
    }
    schema = factory.json_schema(PERSON)
    constrained = {
        "schema-greedy": (chat(smol, PERSON_PROMPT),
                          SamplingParams(temperature=0, max_tokens=64, constraint=schema)),
        "schema-sampled": (chat(smol, PERSON_PROMPT),
                           SamplingParams(temperature=1.0, seed=7, max_tokens=64,
                                          constraint=schema)),
        "object-sampled": (chat(smol, CAT),
                           SamplingParams(temperature=0.7, seed=3, max_tokens=32,
                                          constraint=factory.json_object())),
    }
    alone = run_engine(Engine(model, tok.eos_ids), plain)
    engine = Engine(model, tok.eos_ids)
    mixed = run_engine(engine, {**constrained, **plain})
    for rid in plain:
        assert mixed[rid] == alone[rid], rid
    for rid in ("schema-greedy", "schema-sampled"):
        ids, reason = mixed[rid]
        assert reason == "stop"
        jsonschema.validate(json.loads(tok.decode(ids, skip_special_tokens=True)), PERSON)
    ids, reason = mixed["object-sampled"]
    if reason == "stop":
        assert isinstance(json.loads(tok.decode(ids, skip_special_tokens=True)), dict)
    assert mixed["schema-greedy"][0] == person_runs[0].token_ids  # both paths agree
    assert engine.stats.kv_blocks_used == 0
