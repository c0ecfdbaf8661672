"""Hugging Face config.json <-> ModelConfig, checked against transformers' own config classes."""

import pytest
import transformers

from pagoda.errors import ConfigError
from pagoda.model.config import ModelConfig
from pagoda.model.hf_config import config_from_hf, config_to_hf, hf_compatible
from pagoda.model.presets import PRESETS

HF_PRESETS = ["smollm2-135m", "llama3.2-1b", "llama3-8b", "mistral-7b", "qwen2-0.5b", "gpt2",
              "bert-base", "minilm-l6", "e5-small-multilingual"]


def through_transformers(hf: dict) -> dict:
    """What transformers writes back after reading `hf` (its own config class, v5 layout)."""
    hf = dict(hf)
    return transformers.AutoConfig.for_model(hf.pop("model_type"), **hf).to_dict()


def same_model(a: ModelConfig, b: ModelConfig) -> None:
    """Equal in every field that changes what the model computes."""
    skip = {"name", "extra", "init_std", "dropout", "moe_aux_loss_coef", "bos_token_id",
            "eos_token_id", "n_kv_head", "head_dim"}  # the last two: compared resolved below
    for key, value in a.to_dict().items():
        if key not in skip:
            assert getattr(b, key) == value, key
    assert (a.kv_heads, a.dim_head) == (b.kv_heads, b.dim_head)


@pytest.mark.parametrize("name", HF_PRESETS)
def test_round_trip_through_transformers(name):
    cfg = PRESETS[name]
    assert hf_compatible(cfg)
    hf = through_transformers(config_to_hf(cfg))
    same_model(cfg, config_from_hf(hf, name=name))


def test_llama3_rope_scaling_in_both_layouts():
    cfg = PRESETS["llama3.2-1b"]
    v4 = config_to_hf(cfg)  # rope_theta + rope_scaling at the top level
    assert v4["rope_scaling"]["rope_type"] == "llama3"
    v5 = through_transformers(v4)  # rope_parameters
    assert v5["rope_parameters"]["rope_type"] == "llama3"
    for hf in (v4, v5):
        back = config_from_hf(hf)
        assert back.rope_theta == 500000.0 and back.rope_scaling == cfg.rope_scaling


def test_unsupported_rope_scaling_is_refused_in_both_layouts():
    base = config_to_hf(PRESETS["smollm2-135m"])
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    with pytest.raises(ConfigError, match="unsupported rope scaling 'yarn'"):
        config_from_hf({**base, "rope_scaling": yarn})
    with pytest.raises(ConfigError, match="unsupported rope scaling 'yarn'"):
        config_from_hf({**base, "rope_parameters": {**yarn, "rope_theta": 10000.0}})


MINIMAL = {
    "llama": dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=96),
    # (transformers' Mistral/Qwen2 classes default num_key_value_heads to 8/32 whatever the
    # number of heads; every real config.json states it)
    "mistral": dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=96),
    "qwen2": dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96),
    "gpt2": dict(vocab_size=100, n_embd=64, n_layer=2, n_head=4),
    "bert": dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=96),
    "xlm-roberta": dict(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=96),
}


@pytest.mark.parametrize("model_type", list(MINIMAL))
def test_missing_fields_take_transformers_defaults(model_type):
    """A config.json that leaves fields out means what transformers' config class says."""
    ours = config_from_hf({"model_type": model_type, **MINIMAL[model_type]})
    same_model(ours, config_from_hf(through_transformers({"model_type": model_type,
                                                          **MINIMAL[model_type]})))


def test_qwen2_sliding_window_needs_the_switch_and_every_layer():
    base = {"model_type": "qwen2", **MINIMAL["qwen2"], "sliding_window": 8}
    assert config_from_hf(base).sliding_window is None  # use_sliding_window defaults to False
    on = {**base, "use_sliding_window": True}
    assert config_from_hf(on).sliding_window is None  # layers >= max_window_layers (28) only
    assert config_from_hf({**on, "max_window_layers": 0}).sliding_window == 8
    with pytest.raises(ConfigError, match="mixes full and sliding-window"):
        config_from_hf({**on, "max_window_layers": 1})
    cfg = ModelConfig.from_name("qwen2-0.5b", n_layer=2, sliding_window=8)
    hf = through_transformers(config_to_hf(cfg))
    assert set(hf["layer_types"]) == {"sliding_attention"}
    assert config_from_hf(hf).sliding_window == 8


def test_llama_ignores_sliding_window_like_transformers():
    hf = {"model_type": "llama", **MINIMAL["llama"], "sliding_window": 4}
    assert config_from_hf(hf).sliding_window is None


def test_biases_follow_each_family():
    llama = config_from_hf({"model_type": "llama", **MINIMAL["llama"], "attention_bias": True,
                            "mlp_bias": True})
    assert llama.attn_qkv_bias and llama.attn_out_bias and llama.ffn_bias
    mistral = config_from_hf({"model_type": "mistral", **MINIMAL["mistral"],
                              "attention_bias": True, "mlp_bias": True})  # both ignored by HF
    assert not (mistral.attn_qkv_bias or mistral.attn_out_bias or mistral.ffn_bias)
    qwen = config_from_hf({"model_type": "qwen2", **MINIMAL["qwen2"]})
    assert qwen.attn_qkv_bias and not qwen.attn_out_bias and not qwen.ffn_bias


def test_eos_list_takes_the_first_id():
    hf = {"model_type": "llama", **MINIMAL["llama"], "bos_token_id": 1, "eos_token_id": [2, 7]}
    cfg = config_from_hf(hf)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)


def test_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(ConfigError) as err:
        config_from_hf({"model_type": "t5", "hidden_size": 8})
    assert "unsupported model_type 't5'" in str(err.value)
    assert "llama, mistral, qwen2, gpt2, bert, xlm-roberta" in str(err.value)
    with pytest.raises(ConfigError, match="unsupported model_type None"):
        config_from_hf({})


def test_bert_is_the_post_norm_bidirectional_encoder():
    cfg = config_from_hf({"model_type": "bert", **MINIMAL["bert"], "layer_norm_eps": 1e-7})
    assert (cfg.arch, cfg.pos_encoding, cfg.norm, cfg.norm_position, cfg.activation) == \
        ("bert", "learned", "layernorm", "post", "gelu")
    assert not cfg.causal and not cfg.lm_head and not cfg.final_norm and cfg.embed_norm
    assert cfg.type_vocab_size == 2 and cfg.norm_eps == 1e-7 and cfg.max_seq_len == 512
    assert cfg.attn_qkv_bias and cfg.attn_out_bias and cfg.ffn_bias and not cfg.gated_ffn


def test_xlm_roberta_positions_start_after_the_padding_index():
    cfg = config_from_hf({"model_type": "xlm-roberta", **MINIMAL["xlm-roberta"],
                          "max_position_embeddings": 514})
    assert cfg.arch == "xlm-roberta" and cfg.max_seq_len == 512
    hf = config_to_hf(cfg)
    assert (hf["max_position_embeddings"], hf["pad_token_id"]) == (514, 1)


@pytest.mark.parametrize("model_type, change, message", [
    ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_k"),
    ("bert", {"is_decoder": True}, "BERT decoder"),
    ("xlm-roberta", {"pad_token_id": 0}, "pad_token_id 0"),
])
def test_encoder_variants_pagoda_cannot_compute_are_refused(model_type, change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_hf({"model_type": model_type, **MINIMAL[model_type], **change})


def test_missing_required_field_is_named():
    hf = {"model_type": "llama", **MINIMAL["llama"]}
    del hf["intermediate_size"]
    with pytest.raises(ConfigError, match="lacks the field 'intermediate_size'"):
        config_from_hf(hf)


def test_unknown_activation_is_a_readable_error():
    with pytest.raises(ConfigError, match="unsupported activation 'quick_gelu'"):
        config_from_hf({"model_type": "llama", **MINIMAL["llama"], "hidden_act": "quick_gelu"})


def test_impossible_shapes_in_config_json_are_config_errors():
    with pytest.raises(ConfigError, match="n_kv_head"):
        config_from_hf({"model_type": "llama", **MINIMAL["llama"], "num_key_value_heads": 3})


@pytest.mark.parametrize("name, changes", [
    ("transformer-base", {}),
    ("tiny-moe", {}),
    ("tiny-llama", {"causal": False}),
    ("tiny-llama", {"norm_position": "post"}),
    ("tiny-llama", {"scale_embeddings": True}),
    ("tiny-llama", {"sliding_window": 8}),  # transformers' Llama has no window
    ("tiny-llama", {"attn_qkv_bias": True}),  # Llama's attention_bias also covers o_proj
    ("mistral-7b", {"attn_qkv_bias": True}),  # Mistral has no biases at all
    ("qwen2-0.5b", {"attn_qkv_bias": False}),  # Qwen2 always has q/k/v biases
    ("qwen2-0.5b", {"ffn_bias": True}),
    ("gpt2", {"n_kv_head": 4}),  # GPT-2 has no GQA
    ("gpt2", {"head_dim": 32}),
    ("gpt2", {"scale_embeddings": True}),
    ("gpt2", {"pos_encoding": "rope"}),
    ("gpt2", {"type_vocab_size": 2}),
    ("minilm-l6", {"embed_norm": False}),
    ("minilm-l6", {"norm_position": "pre"}),
    ("minilm-l6", {"causal": True}),
    ("minilm-l6", {"type_vocab_size": 0}),
])
def test_configs_transformers_cannot_compute_are_not_exported(name, changes):
    cfg = ModelConfig.from_name(name, **changes)
    assert not hf_compatible(cfg)
    with pytest.raises(ConfigError, match="no Hugging Face equivalent"):
        config_to_hf(cfg)


def test_family_options_that_transformers_has_are_exported():
    assert hf_compatible(ModelConfig.from_name("tiny-llama", attn_qkv_bias=True,
                                               attn_out_bias=True, ffn_bias=True))
    assert hf_compatible(ModelConfig.from_name("mistral-7b", sliding_window=None))
    assert hf_compatible(ModelConfig.from_name("gpt2", activation="relu", tie_embeddings=False))
