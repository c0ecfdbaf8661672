"""ModelConfig: defaults, validation messages, dict/JSON round trips and preset lookup."""

import json

import pytest

from pagoda.errors import ConfigError, PagodaError
from pagoda.model.config import ModelConfig
from pagoda.model.presets import PRESETS


def test_defaults_resolve_heads_and_head_dim():
    cfg = ModelConfig(d_model=64, n_head=4, d_ff=128)
    assert cfg.kv_heads == 4 and cfg.dim_head == 16
    cfg = ModelConfig(d_model=64, n_head=4, n_kv_head=1, head_dim=32, d_ff=128)
    assert cfg.kv_heads == 1 and cfg.dim_head == 32


@pytest.mark.parametrize("fields, words", [
    (dict(d_model=65, n_head=4), ["d_model (65)", "n_head (4)"]),
    (dict(n_head=4, n_kv_head=3), ["n_head (4)", "n_kv_head (3)"]),
    (dict(d_model=36, n_head=4, pos_encoding="rope"), ["RoPE", "even head_dim", "9"]),
    (dict(d_model=36, n_head=4, head_dim=7), ["RoPE", "7"]),
    (dict(activation="swish"), ["activation", "swish", "silu, gelu, gelu_tanh, relu"]),
    (dict(norm="batchnorm"), ["norm must be one of", "batchnorm"]),
    (dict(pos_encoding="alibi"), ["pos_encoding", "alibi"]),
    (dict(norm_position="sandwich"), ["norm_position", "sandwich"]),
    (dict(dropout=1.0), ["dropout", "[0, 1)"]),
    (dict(dropout=-0.1), ["dropout"]),
    (dict(n_experts=4, n_experts_per_token=5), ["n_experts_per_token (5)", "(4)"]),
    (dict(n_experts=4, n_experts_per_token=0), ["n_experts_per_token (0)"]),
    (dict(vocab_size=0), ["vocab_size must be positive, got 0"]),
    (dict(n_layer=-1), ["n_layer must be positive"]),
    (dict(d_ff=0), ["d_ff must be positive"]),
])
def test_impossible_configs_are_refused_with_the_field_named(fields, words):
    with pytest.raises(ConfigError) as err:
        ModelConfig(name="mine", **fields)
    message = str(err.value)
    assert message.startswith("config 'mine': ")
    for word in words:
        assert word in message
    assert isinstance(err.value, PagodaError)


def test_odd_head_dim_is_fine_without_rope():
    cfg = ModelConfig(d_model=36, n_head=4, d_ff=64, pos_encoding="learned")
    assert cfg.dim_head == 9


def test_explicit_head_dim_lifts_the_divisibility_rule():
    cfg = ModelConfig(d_model=60, n_head=4, head_dim=16, d_ff=64)
    assert cfg.dim_head == 16


def test_replace_copies_and_validates_again():
    base = ModelConfig.from_name("tiny-llama")
    changed = base.replace(n_layer=3)
    assert changed.n_layer == 3 and base.n_layer == 2
    with pytest.raises(ConfigError, match="n_kv_head"):
        base.replace(n_kv_head=3)


def test_dict_round_trip_is_plain_json():
    for name in ("llama3.2-1b", "transformer-base", "tiny-moe", "gpt2"):
        cfg = ModelConfig.from_name(name)
        data = json.loads(json.dumps(cfg.to_dict()))
        assert ModelConfig.from_dict(data) == cfg


def test_from_dict_names_unknown_keys():
    data = {**ModelConfig.from_name("tiny-llama").to_dict(), "n_layers": 4, "hidden": 1}
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(data)
    message = str(err.value)
    assert "unknown config keys: hidden, n_layers" in message
    assert "n_layer" in message.split("known:")[1]


def test_from_dict_still_validates():
    data = {**ModelConfig.from_name("tiny-llama").to_dict(), "n_kv_head": 3}
    with pytest.raises(ConfigError, match="n_kv_head"):
        ModelConfig.from_dict(data)


def test_from_file(tmp_path):
    cfg = ModelConfig.from_name("tiny-moe")
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_file(path) == cfg
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config file"):
        ModelConfig.from_file(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        ModelConfig.from_file(tmp_path / "missing.json")


def test_from_name_and_overrides():
    cfg = ModelConfig.from_name("smollm2-135m")
    assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.kv_heads) == (576, 30, 9, 3)
    small = ModelConfig.from_name("smollm2-135m", n_layer=2, max_seq_len=64)
    assert (small.n_layer, small.max_seq_len, small.d_model) == (2, 64, 576)
    with pytest.raises(ConfigError, match="n_kv_head"):
        ModelConfig.from_name("smollm2-135m", n_kv_head=2)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_name("gpt5")
    message = str(err.value)
    assert "unknown preset 'gpt5'" in message
    for name in PRESETS:
        assert name in message


def test_from_name_returns_a_copy_the_caller_may_change():
    cfg = ModelConfig.from_name("llama3.2-1b")
    cfg.n_layer = 1
    cfg.rope_scaling["factor"] = 2.0
    cfg.extra["note"] = "mine"
    fresh = ModelConfig.from_name("llama3.2-1b")
    assert fresh.n_layer == 16 and fresh.rope_scaling["factor"] == 32.0 and fresh.extra == {}
