"""`pagoda pretrain CONFIG.yaml --set ...`: a short run, and bad input as one-line errors."""

from __future__ import annotations

import json

import pytest

from pagoda.cli import main
from pagoda.data.tokenize import tokenize_corpus
from pagoda.tokenizer.train import train_tokenizer


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    (root / "text.txt").write_text("to be or not to be, that is the question. " * 40)
    train_tokenizer([root / "text.txt"], None, root / "tok", kind="char", held_out_fraction=0)
    tokenize_corpus([root / "text.txt"], root / "tok", root / "shards", workers=1,
                    val_fraction=0.1)
    config = root / "run.yaml"
    config.write_text(f"""
model: {{preset: baby-gpt, n_layer: 1, n_head: 2, d_model: 32, d_ff: 64, max_seq_len: 16}}
data: {{shards: {root / 'shards'}, block_size: 16, batch_size: 2}}
train: {{max_steps: 50, eval_batches: 1, out_dir: {root / 'run'}, device: cpu}}
""")
    return config


def test_pretrain_runs_with_overrides(capsys, run_yaml):
    code = main(["pretrain", str(run_yaml), "--set", "train.max_steps=2", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and "val_loss" in summary
    assert (run_yaml.parent / "run" / "step-000002" / "model.safetensors").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--set", "optim.lr=-1"], "error: optim.lr must be positive, got -1.0"),
    (["--set", "optim.learning_rate=1"], "error: unknown key optim.learning_rate"),
    (["--set", "model.n_head=3"], "is not divisible by n_head (3)"),
    (["--set", "data.shards=/nonexistent"], "no such token-shard folder"),
])
def test_bad_input_is_one_line(capsys, run_yaml, argv, message):
    assert main(["pretrain", str(run_yaml), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_config_file(capsys, tmp_path):
    assert main(["pretrain", str(tmp_path / "none.yaml")]) == 1
    assert "config file not found" in capsys.readouterr().err
