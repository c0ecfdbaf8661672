"""Presets: every one builds, and the public families have the published shapes and sizes."""

import pytest
import torch

from pagoda.model.config import ModelConfig
from pagoda.model.hf_config import config_to_hf, hf_compatible
from pagoda.model.presets import PRESETS
from pagoda.model.transformer import Transformer

# Parameter totals published on the model cards / safetensors headers of the real checkpoints.
PUBLISHED = {
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
    "llama3.2-1b": 1_235_814_400,
    "llama3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2-0.5b": 494_032_768,
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    # Encoders: the published totals include BERT's pooler (d·d + d), which sentence embeddings
    # do not use and Pagoda does not build.
    "bert-base": 109_482_240 - (768 * 768 + 768),
    "minilm-l6": 22_713_216 - (384 * 384 + 384),
}


def n_params(cfg: ModelConfig) -> int:
    return sum(p.numel() for p in Transformer.on_meta(cfg).parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_valid_and_builds_on_meta(name):
    cfg = PRESETS[name]
    assert cfg.name == name
    assert cfg.arch in ("llama", "mistral", "qwen2", "gpt2", "bert", "xlm-roberta")
    cfg.validate()
    assert ModelConfig.from_name(name) == cfg
    model = Transformer.on_meta(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert len(model.layers) == cfg.n_layer


@pytest.mark.parametrize("name, total", PUBLISHED.items())
def test_published_parameter_totals(name, total):
    assert n_params(PRESETS[name]) == total


@pytest.mark.parametrize("name", [n for n, c in PRESETS.items()
                                  if hf_compatible(c) and n != "gpt3-175b"])
def test_transformers_builds_the_same_shapes(name):
    """The Hugging Face class built from our config.json has exactly our parameter count."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = PRESETS[name]
    hf_dict = config_to_hf(cfg)
    hf_cfg = AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    with torch.device("meta"):
        hf = (AutoModelForCausalLM.from_config(hf_cfg) if cfg.lm_head
              else AutoModel.from_config(hf_cfg, add_pooling_layer=False))
    skipped = 2 * cfg.d_model if cfg.arch == "xlm-roberta" else 0  # position rows before 0
    assert sum(p.numel() for p in hf.parameters()) - skipped == n_params(cfg)


def test_family_switches():
    smol, gpt2, mistral, qwen = (PRESETS[n] for n in ("smollm2-135m", "gpt2", "mistral-7b",
                                                       "qwen2-0.5b"))
    assert (smol.pos_encoding, smol.norm, smol.activation, smol.gated_ffn) == \
        ("rope", "rmsnorm", "silu", True)
    assert smol.rope_theta == 100000.0 and smol.tie_embeddings and smol.kv_heads == 3
    assert (gpt2.pos_encoding, gpt2.norm, gpt2.activation, gpt2.gated_ffn) == \
        ("learned", "layernorm", "gelu_tanh", False)
    assert gpt2.attn_qkv_bias and gpt2.attn_out_bias and gpt2.ffn_bias and gpt2.tie_embeddings
    assert mistral.sliding_window == 4096 and not mistral.tie_embeddings
    assert qwen.attn_qkv_bias and not qwen.attn_out_bias and qwen.norm_eps == 1e-6
    assert PRESETS["llama3.2-1b"].rope_scaling["factor"] == 32.0


def test_attention_is_all_you_need_base():
    cfg = PRESETS["transformer-base"]
    assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.d_ff, cfg.dropout) == (512, 6, 8, 2048, 0.1)
    assert cfg.pos_encoding == "sinusoidal" and cfg.scale_embeddings
    assert cfg.norm_position == "post" and not cfg.final_norm
    assert cfg.activation == "relu" and not cfg.gated_ffn
    assert not hf_compatible(cfg)


def test_minilm_is_a_small_bert_encoder():
    cfg = PRESETS["minilm-l6"]
    assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.d_ff, cfg.vocab_size) == \
        (384, 6, 12, 1536, 30522)
    assert not cfg.causal and not cfg.lm_head and cfg.embed_norm and cfg.type_vocab_size == 2
    assert cfg.norm_position == "post" and cfg.activation == "gelu" and cfg.norm_eps == 1e-12


def test_gpt3_shapes():
    cfg = PRESETS["gpt3-175b"]
    assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.max_seq_len) == (12288, 96, 96, 2048)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-moe"])
def test_tiny_presets_are_small_enough_for_tests(name):
    assert n_params(PRESETS[name]) < 300_000
