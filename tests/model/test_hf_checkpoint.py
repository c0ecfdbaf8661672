"""Hugging Face checkpoints, both directions, against `transformers` on tiny random models.

transformers -> save_pretrained -> `load_hf_checkpoint` must give the same logits (fp32, 1e-4)
and the same 32 greedy tokens; `save_hf_checkpoint` -> `AutoModelForCausalLM.from_pretrained`
must give the same logits; configs transformers lacks (MoE, post-norm) round-trip exactly.
"""

import json
import shutil

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from pagoda.errors import ConfigError, WeightsError
from pagoda.infer.generate import generate_tokens
from pagoda.infer.sampling import SamplingParams
from pagoda.model.config import ModelConfig
from pagoda.model.hf_checkpoint import (
    PAGODA_CONFIG,
    load_hf_checkpoint,
    load_state,
    save_hf_checkpoint,
)
from pagoda.model.transformer import Transformer

VOCAB = 300
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=96, max_position_embeddings=128, bos_token_id=None,
                   eos_token_id=None, pad_token_id=None)
HF_CONFIGS = {
    "llama-tied-gqa": lambda: transformers.LlamaConfig(
        **_LLAMA_LIKE, num_key_value_heads=2, tie_word_embeddings=True),
    "llama-untied-mha-bias": lambda: transformers.LlamaConfig(
        **_LLAMA_LIKE, num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True,
        mlp_bias=True),
    "llama3-rope-scaling": lambda: transformers.LlamaConfig(
        **_LLAMA_LIKE, num_key_value_heads=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2-qkv-bias": lambda: transformers.Qwen2Config(**_LLAMA_LIKE, num_key_value_heads=2),
    "mistral-mqa-wide-window": lambda: transformers.MistralConfig(
        **_LLAMA_LIKE, num_key_value_heads=1, sliding_window=100),
    "mistral-narrow-window": lambda: transformers.MistralConfig(
        **_LLAMA_LIKE, num_key_value_heads=2, sliding_window=5),
    "gpt2-conv1d": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=None,
        eos_token_id=None),
}
SEQ = 24  # longer than the narrow window, shorter than the wide one


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Add noise to every parameter, so biases and norm weights are not their 0/1 init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def random_ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def hf_pair(request, tmp_path_factory):
    """(transformers model, Pagoda model loaded from its save_pretrained folder)."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(HF_CONFIGS[request.param]()).eval()
    perturb(hf, scale=0.3)  # large enough that greedy decoding does not just repeat a token
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, load_hf_checkpoint(folder)


def test_logits_match_transformers(hf_pair):
    name, hf, ours = hf_pair
    ids = random_ids(2, SEQ)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() <= 1e-4
    if name == "mistral-narrow-window":
        assert ours.cfg.sliding_window == 5 < SEQ
    if name == "llama3-rope-scaling":
        assert ours.cfg.rope_scaling["factor"] == 8.0


def test_greedy_tokens_match_transformers(hf_pair):
    _, hf, ours = hf_pair
    prompt = random_ids(1, 8, seed=1)
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           max_new_tokens=32, min_new_tokens=32)[0, 8:].tolist()
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    got = [e.token_id for step in generate_tokens(ours, prompt.tolist(), [params]) for e in step]
    assert len(got) == 32 and len(set(got)) > 8
    assert got == expected


def test_sharded_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(HF_CONFIGS["qwen2-qkv-bias"]()).eval()
    perturb(hf)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    ours = load_hf_checkpoint(tmp_path)
    ids = random_ids(2, 10)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


TINY = dict(vocab_size=VOCAB, max_seq_len=128, d_model=64, n_layer=2, n_head=4, d_ff=96,
            bos_token_id=None, eos_token_id=None)
PAGODA_CONFIGS = {
    "llama-tied-gqa": ModelConfig.from_name("tiny-llama", **TINY, n_kv_head=2),
    "llama-untied-llama3": ModelConfig.from_name(
        "llama3.2-1b", **TINY, n_kv_head=1, tie_embeddings=False,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}),
    "qwen2": ModelConfig.from_name("qwen2-0.5b", **TINY, n_kv_head=2),
    "qwen2-window": ModelConfig.from_name("qwen2-0.5b", **TINY, n_kv_head=2, sliding_window=6),
    "mistral-window": ModelConfig.from_name("mistral-7b", **TINY, n_kv_head=2, sliding_window=6),
    "gpt2": ModelConfig.from_name("gpt2", **TINY),
    "gpt2-untied-relu": ModelConfig.from_name("gpt2", **TINY, tie_embeddings=False,
                                              activation="relu"),
}


def random_pagoda(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    perturb(model)
    return model


@pytest.mark.parametrize("name", list(PAGODA_CONFIGS))
def test_transformers_loads_what_pagoda_saves(name, tmp_path):
    ours = random_pagoda(PAGODA_CONFIGS[name])
    save_hf_checkpoint(ours, tmp_path)
    hf_json = json.loads((tmp_path / "config.json").read_text())
    assert hf_json["model_type"] == ours.cfg.arch
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.tie_word_embeddings == ours.cfg.tie_embeddings
    ids = random_ids(2, 20)
    with torch.no_grad():
        expected = ours(ids)
        assert (hf(ids).logits - expected).abs().max().item() <= 1e-4
        assert torch.equal(load_hf_checkpoint(tmp_path)(ids), expected)


@pytest.mark.parametrize("name, overrides", [
    ("tiny-moe", {}),
    ("transformer-base", {"dropout": 0.1}),  # post-norm, sinusoidal, scaled embeddings
    ("baby-gpt", {"tie_embeddings": False}),
])
def test_configs_without_an_hf_class_round_trip_exactly(name, overrides, tmp_path):
    cfg = ModelConfig.from_name(name, **{**TINY, **overrides})
    ours = random_pagoda(cfg)
    save_hf_checkpoint(ours, tmp_path)
    assert not (tmp_path / "config.json").exists()  # transformers must not misread it
    back = load_hf_checkpoint(tmp_path)
    assert back.cfg == cfg
    ids = random_ids(2, 20)
    with torch.no_grad():
        assert torch.equal(back(ids), ours(ids))
    if cfg.tie_embeddings:
        assert back.lm_head.weight is back.embed.weight


def test_saving_over_another_checkpoint_replaces_it(tmp_path):
    """A later save into the same folder wins, whatever the earlier one left there."""
    hf = AutoModelForCausalLM.from_config(HF_CONFIGS["llama-tied-gqa"]())
    hf.save_pretrained(tmp_path, max_shard_size="40KB")  # sharded: index + several files
    moe = random_pagoda(ModelConfig.from_name("tiny-moe", **TINY))
    save_hf_checkpoint(moe, tmp_path)
    ids = random_ids(1, 9)
    with torch.no_grad():
        assert torch.equal(load_hf_checkpoint(tmp_path)(ids), moe(ids))
    llama = random_pagoda(PAGODA_CONFIGS["llama-tied-gqa"])
    save_hf_checkpoint(llama, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_hf_checkpoint(tmp_path)(ids), llama(ids))
        hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert (hf(ids).logits - llama(ids)).abs().max().item() <= 1e-4


def test_save_leaves_no_temporary_files(tmp_path):
    save_hf_checkpoint(random_pagoda(PAGODA_CONFIGS["gpt2"]), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors",
                                                          PAGODA_CONFIG]


def test_loads_in_bf16(tmp_path):
    save_hf_checkpoint(random_pagoda(PAGODA_CONFIGS["qwen2"]), tmp_path)
    model = load_hf_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.rope_cos.dtype == torch.float32  # position tables stay exact
    assert not model.training


# --- BERT encoders: hidden states, not logits ----------------------------------------------

BERT = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=96, max_position_embeddings=64, type_vocab_size=2)


def padded_batch(lengths: list[int], seed: int = 2, types: int = 2) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, random token types (< `types`), and the bool mask of real tokens.
    Padding is id 1 and real ids are >= 2: XLM-R numbers positions by counting ids != 1."""
    T = max(lengths)
    real = torch.arange(T)[None] < torch.tensor(lengths)[:, None]  # (B, T)
    ids = (random_ids(len(lengths), T, seed=seed) % (VOCAB - 2) + 2).masked_fill(~real, 1)
    types = (random_ids(len(lengths), T, seed=seed + 1) % types).masked_fill(~real, 0)
    return ids, types, real


def assert_same_hidden(hf: torch.nn.Module, ours: Transformer) -> None:
    """Same hidden states at every real token of a padded batch (fp32, 1e-4)."""
    ids, types, real = padded_batch([20, 13, 5, 1], types=ours.cfg.type_vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=ids, token_type_ids=types, attention_mask=real.long())
        got = ours(ids, token_types=types, attention_mask=real)
    assert got.shape == expected.last_hidden_state.shape
    assert (got - expected.last_hidden_state)[real].abs().max().item() <= 1e-4


ENCODERS = {  # class name -> (config, the bare encoder inside the class)
    "BertModel": (lambda: transformers.BertConfig(**BERT), lambda m: m),
    "BertForMaskedLM": (lambda: transformers.BertConfig(**BERT), lambda m: m.bert),
    "XLMRobertaModel": (lambda: transformers.XLMRobertaConfig(**BERT), lambda m: m),
    "XLMRobertaForMaskedLM": (lambda: transformers.XLMRobertaConfig(**BERT), lambda m: m.roberta),
}


@pytest.mark.parametrize("head", list(ENCODERS))
def test_encoder_hidden_states_match_transformers(head, tmp_path):
    """BERT and XLM-R, bare (with a pooler) or under a task head (a "bert."/"roberta." prefix),
    load as encoders; XLM-R's positions start after its padding index."""
    config, encoder = ENCODERS[head]
    torch.manual_seed(0)
    hf = getattr(transformers, head)(config()).eval()
    perturb(hf, scale=0.3)
    hf.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(tmp_path)
    cfg = ours.cfg
    assert (cfg.causal, cfg.lm_head, cfg.norm_position, cfg.type_vocab_size) == \
        (False, False, "post", 2)
    assert cfg.max_seq_len == (62 if head.startswith("XLM") else 64)
    assert_same_hidden(encoder(hf), ours)


@pytest.mark.parametrize("arch, hf_class", [("bert", "BertModel"),
                                            ("xlm-roberta", "XLMRobertaModel")])
def test_transformers_loads_the_encoder_pagoda_saves(arch, hf_class, tmp_path):
    ours = random_pagoda(ModelConfig.from_name("minilm-l6", **TINY, arch=arch))
    save_hf_checkpoint(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [hf_class]
    hf = getattr(transformers, hf_class).from_pretrained(tmp_path, add_pooling_layer=False).eval()
    assert_same_hidden(hf, ours)
    back = load_hf_checkpoint(tmp_path)
    ids, types, real = padded_batch([7, 3], types=ours.cfg.type_vocab_size)
    with torch.no_grad():
        assert torch.equal(back(ids, token_types=types, attention_mask=real),
                           ours(ids, token_types=types, attention_mask=real))


# --- bad input -----------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """A good HF-layout checkpoint folder to break."""
    folder = tmp_path / "ckpt"
    save_hf_checkpoint(random_pagoda(PAGODA_CONFIGS["llama-tied-gqa"]), folder)
    (folder / PAGODA_CONFIG).unlink()  # read config.json, as for a downloaded checkpoint
    return folder


def test_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="has no config.json"):
        load_hf_checkpoint(tmp_path)


def test_folder_without_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"has no \*.safetensors weights"):
        load_hf_checkpoint(saved)


def test_unreadable_config_json(saved):
    (saved / "config.json").write_text("{oops")
    with pytest.raises(WeightsError, match="cannot read .*config.json"):
        load_hf_checkpoint(saved)


def test_unsupported_model_type(saved):
    hf = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**hf, "model_type": "t5"}))
    with pytest.raises(ConfigError, match="unsupported model_type 't5'.*supported: llama"):
        load_hf_checkpoint(saved)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(saved, keep):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(WeightsError, match="model.safetensors is truncated or corrupt"):
        load_hf_checkpoint(saved)


def test_corrupt_safetensors_header(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header starts after an 8-byte length
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_hf_checkpoint(saved)


def test_shapes_that_do_not_match_the_config(saved):
    hf = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**hf, "intermediate_size": 128}))
    with pytest.raises(WeightsError) as err:
        load_hf_checkpoint(saved)
    message = str(err.value)
    assert "ffn" in message and "(96, 64)" in message and "(128, 64)" in message


def test_missing_tensors(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(WeightsError, match="lacks 1 tensors .*layers.1.ffn.up_proj.weight"):
        load_hf_checkpoint(saved)


def test_a_checkpoint_with_more_layers_than_the_config(saved):
    hf = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": 1}))
    with pytest.raises(WeightsError, match="tensors the config does not use.*layers.1"):
        load_hf_checkpoint(saved)


def test_biases_the_config_does_not_declare(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.ones(64)
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(WeightsError, match="q_proj.bias"):
        load_hf_checkpoint(saved)


def test_sharded_index_problems(saved, tmp_path):
    index = saved / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": "gone.safetensors"}}))
    with pytest.raises(WeightsError, match="gone.safetensors"):
        load_hf_checkpoint(saved)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(WeightsError, match="weight_map"):
        load_hf_checkpoint(saved)


def test_load_state_reads_all_shards(tmp_path):
    hf = AutoModelForCausalLM.from_config(HF_CONFIGS["gpt2-conv1d"]())
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    state = load_state(tmp_path)
    assert "transformer.h.1.attn.c_attn.weight" in state
    assert state["transformer.h.1.attn.c_attn.weight"].shape == (64, 192)  # Conv1D: (in, 3 out)
    other = tmp_path.parent / "copy"
    shutil.copytree(tmp_path, other)
    assert load_state(other).keys() == state.keys()
