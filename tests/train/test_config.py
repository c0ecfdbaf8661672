"""PretrainConfig: YAML and --set overrides checked against the dataclasses, one line per error."""

from __future__ import annotations

import pytest

from pagoda.errors import ConfigError
from pagoda.train.config import load_config

BASE = {"data": {"shards": "shards"}}


def config(overrides=(), **sections):
    return load_config(data={**BASE, **sections}, overrides=list(overrides))


def test_yaml_file_with_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: baby-gpt}\ndata: {shards: s, block_size: 64}\n"
                    "optim: {lr: 1e-3, betas: [0.9, 0.99]}\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-3  # YAML reads 1e-3 as a string; the float field converts it
    assert cfg.optim.betas == (0.9, 0.99) and cfg.data.block_size == 64
    assert cfg.train.objective == "clm" and cfg.schedule.kind == "cosine"


def test_overrides_are_typed_by_their_field():
    cfg = config(["optim.lr=3e-4", "train.max_steps=100", "optim.betas=0.9,0.99",
                  "train.resume=true", "train.out_dir=runs/x", "model.n_layer=3",
                  "train.mask_token_id=null", "train.device=cpu"])
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 100
    assert cfg.optim.betas == (0.9, 0.99) and cfg.train.resume is True
    assert cfg.train.out_dir == "runs/x" and cfg.model == {"n_layer": 3}
    assert cfg.train.mask_token_id is None and cfg.train.device == "cpu"


@pytest.mark.parametrize("sections, overrides, message", [
    ({"optim": {"learning_rate": 1}}, [], "unknown key optim.learning_rate (allowed: name, lr"),
    ({"trainer": {}}, [], "unknown config section(s) trainer (allowed: model, data"),
    ({"model": {"n_embd": 4}}, [], "unknown key model.n_embd"),
    ({}, ["optim.lr=fast"], "optim.lr must be float, got 'fast'"),
    ({}, ["train.max_steps=1.5"], "train.max_steps must be int"),
    ({}, ["train.dtype=fp8"], "train.dtype must be one of float32, bfloat16, float16"),
    ({}, ["optim.lr=0"], "optim.lr must be positive"),
    ({}, ["optim.lr"], "must look like section.key=value"),
    ({}, ["schedule.min_lr=1"], "schedule.min_lr must be in [0, optim.lr"),
    ({}, ["data.block_size=0"], "data.block_size must be positive"),
    ({}, ["optim.betas=0.9,1.5"], "optim.betas must be in [0, 1)"),
    ({"data": {}}, [], "data.shards is required"),
])
def test_bad_values_are_one_clear_line(sections, overrides, message):
    with pytest.raises(ConfigError) as err:
        config(overrides, **sections)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("model, extra, message", [
    ({"preset": "baby-gpt", "n_head": 5}, {}, "not divisible by n_head"),
    ({"preset": "baby-gpt"}, {"data": {"shards": "s", "block_size": 512}},
     "data.block_size (512) exceeds the model's max_seq_len (256)"),
    ({"preset": "baby-gpt", "vocab_size": 10}, {}, "smaller than the shards' vocabulary"),
    ({"preset": "baby-gpt"}, {"train": {"objective": "mlm"}}, "needs an encoder"),
    ({"preset": "baby-gpt", "causal": False}, {}, "objective clm needs a causal model"),
    ({"preset": "gpt5"}, {}, "unknown preset 'gpt5'"),
])
def test_model_config_is_checked_against_data_and_objective(model, extra, message):
    cfg = config(model=model, **extra)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg.model_config(vocab_size=65)


def test_model_config_takes_the_shards_vocabulary():
    cfg = config(model={"preset": "baby-gpt", "n_layer": 2}).model_config(vocab_size=50, eot_id=3)
    assert cfg.vocab_size == 50 and cfg.n_layer == 2 and cfg.eos_token_id == 3
