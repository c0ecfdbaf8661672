"""`pagoda finetune MODEL DATA --method ...` on a tiny local model folder: runs, saves what each
method makes (the full model generates through `pagoda generate`), and bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagoda.cli import main
from pagoda.model.config import ModelConfig
from pagoda.model.hf_checkpoint import save_hf_checkpoint
from pagoda.model.transformer import Transformer
from pagoda.tokenizer import Tokenizer
from pagoda.tokenizer.train import train_tokenizer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random tiny Llama in the Hugging Face layout with a ChatML BPE tokenizer."""
    root = tmp_path_factory.mktemp("finetune-cli")
    (root / "text.txt").write_text("say hello to the world and the moon " * 50)
    train_tokenizer([root / "text.txt"], 300, root / "tok", held_out_fraction=0)
    tokenizer = Tokenizer.from_file(root / "tok")
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-llama", vocab_size=tokenizer.vocab_size, max_seq_len=128)
    folder = root / "tiny"
    save_hf_checkpoint(Transformer(cfg), folder)
    tokenizer.save(folder)
    return folder


@pytest.fixture(scope="module")
def data(tiny_model) -> Path:
    path = tiny_model.parent / "data.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"say {w}", "output": f"{w} {w}"}) + "\n"
                            for w in ["hello", "world", "moon", "the"] * 4))
    return path


def finetune(capsys, *argv) -> tuple[int, str, str]:
    code = main(["finetune", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("method, files", [
    ("lora", ["adapter_config.json", "adapter_model.safetensors"]),
    ("ptuning", ["adapter_config.json", "adapter_model.safetensors"]),
    ("full", ["model.safetensors", "tokenizer.json", "config.json"]),
])
def test_finetune_json(capsys, tmp_path, tiny_model, data, method, files):
    out = tmp_path / method
    code, stdout, _ = finetune(capsys, tiny_model, data, "--method", method, "--max-steps", 2,
                               "--batch-size", 2, "--seq-len", 64, "--virtual-tokens", 4,
                               "--out", out, "--device", "cpu", "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result["method"] == method and result["steps"] == 2
    assert result["base_model"] == str(tiny_model)
    for name in files:
        assert (out / name).is_file(), name
    assert json.loads((out / "result.json").read_text())["steps"] == 2


def test_options_and_set_reach_the_config(capsys, tmp_path, tiny_model, data):
    out = tmp_path / "lora"
    code, stdout, err = finetune(capsys, tiny_model, data, "--method", "lora", "--rank", 4,
                                 "--alpha", 8, "--max-steps", 1, "--seq-len", 64, "--no-pack",
                                 "--merge", "--set", "lora_targets=q_proj,v_proj",
                                 "--set", "warmup_ratio=0", "--out", out, "--device", "cpu")
    assert code == 0, err
    assert "lora: 1 steps" in stdout and f"merged model in {out / 'merged'}" in stdout
    config = json.loads((out / "result.json").read_text())["config"]
    assert (config["lora_r"], config["lora_alpha"], config["pack"]) == (4, 8.0, False)
    assert config["lora_targets"] == ["q_proj", "v_proj"] and config["warmup_ratio"] == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]


def test_the_full_model_generates(capsys, tmp_path, tiny_model, data):
    out = tmp_path / "full"
    assert finetune(capsys, tiny_model, data, "--method", "full", "--max-steps", 1,
                    "--seq-len", 64, "--out", out, "--device", "cpu", "--json")[0] == 0
    code = main(["generate", str(out), "say hello", "--chat", "--max-tokens", "3",
                 "--temperature", "0", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("argv, needle", [
    (["--set", "lr=-1"], "error: lr must be positive, got -1.0"),
    (["--set", "learning_rate=1"], "error: unknown key learning_rate"),
    (["--seq-len", "4096"], "exceeds the model's context of 128"),
    (["--method", "prompt", "--merge"], "error: merge applies to lora and qlora, not prompt"),
])
def test_bad_options_are_one_line(capsys, tmp_path, tiny_model, data, argv, needle):
    code, _, err = finetune(capsys, tiny_model, data, *argv, "--out", tmp_path / "o",
                            "--device", "cpu")
    assert code == 1 and needle in err and err.count("\n") == 1, err


def test_bad_data_and_out_folder(capsys, tmp_path, tiny_model, data):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n')
    common = ["--seq-len", 64, "--device", "cpu"]
    code, _, err = finetune(capsys, tiny_model, bad, "--out", tmp_path / "o", *common)
    assert code == 1 and f"{bad}:1: the conversation has no assistant turn" in err
    code, _, err = finetune(capsys, tiny_model, tmp_path / "none.jsonl", "--out", tmp_path / "o",
                            *common)
    assert code == 1 and "no such file" in err
    code, _, err = finetune(capsys, tiny_model, data, "--out", tiny_model, *common)
    assert code == 1 and "is the base model's folder" in err
    assert (tiny_model / "model.safetensors").is_file()  # untouched
