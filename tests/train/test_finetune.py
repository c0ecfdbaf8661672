"""The fine-tuning loop on a tiny random Llama + tiny ChatML BPE tokenizer: every method trains
(validation loss falls), freezes what it should, and writes outputs that load back."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagoda.errors import ConfigError
from pagoda.model.config import ModelConfig
from pagoda.model.hf_checkpoint import load_hf_checkpoint
from pagoda.model.lora import attach_adapter, load_adapter, set_active_adapter
from pagoda.model.quantized import quantize_linears
from pagoda.model.transformer import Transformer
from pagoda.tokenizer import Tokenizer
from pagoda.tokenizer.train import train_tokenizer
from pagoda.train.finetune import FinetuneConfig, finetune, lr_at
from pagoda.train.prompt_tuning import load_virtual_tokens

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
# method -> learning rate high enough to see the tiny model learn in a few steps
FAST_LR = {"full": 3e-3, "freeze": 1e-2, "lora": 1e-2, "qlora": 1e-2, "prompt": 0.1,
           "ptuning": 0.1}


def conversations() -> list[dict]:
    """Repeat-the-word tasks in the three formats (the answer is learnable from the prompt)."""
    records = []
    for i in range(48):
        word = WORDS[i % len(WORDS)]
        prompt, answer = f"say {word} twice", f"{word} {word}"
        if i % 3 == 0:
            records.append({"messages": [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": answer}]})
        elif i % 3 == 1:
            records.append({"conversations": [{"from": "human", "value": prompt},
                                              {"from": "gpt", "value": answer}]})
        else:
            records.append({"instruction": prompt, "output": answer})
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conversations()))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, data) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    text = root / "text.txt"
    text.write_text(" ".join(f"say {w} twice {w} {w} user assistant" for w in WORDS) * 20)
    train_tokenizer([text], 300, root / "tok", held_out_fraction=0)
    return Tokenizer.from_file(root / "tok")


def tiny(tokenizer: Tokenizer) -> Transformer:
    torch.manual_seed(0)
    # init_std 0.2: random features rich enough for adapters and prompts to steer in 16 steps
    cfg = ModelConfig.from_name("tiny-llama", vocab_size=tokenizer.vocab_size, max_seq_len=96,
                                init_std=0.2)
    return Transformer(cfg)


def run(tmp_path: Path, tokenizer: Tokenizer, data: Path, method: str,
        **overrides) -> tuple[dict, Transformer, Transformer]:
    """(result, the trained model, a copy of the model before training)."""
    model = tiny(tokenizer)
    before = copy.deepcopy(model)
    settings = {"method": method, "lr": FAST_LR[method], "max_steps": 16, "batch_size": 4,
                "seq_len": 64, "val_fraction": 0.2, "eval_every": 8, "num_virtual_tokens": 6,
                "qlora_group_size": 32, "lora_dropout": 0.0, "warmup_ratio": 0.1,
                "out_dir": str(tmp_path / method), "device": "cpu", "progress": False,
                **overrides}
    result = finetune(model, tokenizer, data, FinetuneConfig(**settings), base_model="tiny")
    return result, model, before


def probe(tokenizer: Tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode("say cat twice")])


@pytest.mark.parametrize("method", ["full", "freeze", "lora", "qlora", "prompt", "ptuning"])
def test_every_method_trains_and_reports(tmp_path, tokenizer, data, method):
    result, _, _ = run(tmp_path, tokenizer, data, method)
    assert result["val_loss"] < 0.8 * result["val_loss_before"], result
    assert result["steps"] == 16 and result["stopped"] == "max_steps"
    saved = json.loads((tmp_path / method / "result.json").read_text())
    assert saved["method"] == method and saved["val_loss"] == result["val_loss"]
    assert 0 < saved["trainable"] <= saved["total"]
    assert saved["trainable_pct"] == pytest.approx(100 * saved["trainable"] / saved["total"])
    if method == "full":
        assert saved["trainable_pct"] == 100
    else:
        assert saved["trainable_pct"] < 100
    assert saved["peak_rss_mb"] > 0 and saved["peak_rss_delta_mb"] >= 0
    assert saved["examples"] == {"train": 38, "val": 10, "truncated": 0, "skipped": 0}
    records = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 8, 16]
    assert len([r for r in records if "loss" in r]) == 16
    assert (tmp_path / method / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_full_and_freeze_save_a_chat_ready_model(tmp_path, tokenizer, data, method):
    overrides = {"freeze_layers": 1} if method == "freeze" else {}
    result, model, before = run(tmp_path, tokenizer, data, method, **overrides)
    out = Path(result["artifact"])
    loaded = load_hf_checkpoint(out)
    ids = probe(tokenizer)
    torch.testing.assert_close(loaded(ids), model.eval()(ids))
    assert Tokenizer.from_file(out).chat_template == tokenizer.chat_template
    changed = {name for name, p in model.state_dict().items()
               if not torch.equal(p, before.state_dict()[name])}
    if method == "full":
        assert "embed.weight" in changed and any(n.startswith("layers.0.") for n in changed)
    else:  # embeddings and block 0 frozen
        assert result["trained_blocks"] == [1]
        assert changed and all(n.startswith(("layers.1.", "final_norm")) for n in changed)


def test_freeze_counts_only_the_top_block(tmp_path, tokenizer, data):
    result, model, _ = run(tmp_path, tokenizer, data, "freeze", freeze_layers=1)
    block = sum(p.numel() for p in model.layers[1].parameters())
    assert result["trainable"] == block + model.final_norm.weight.numel()
    with pytest.raises(ConfigError, match="freeze_layers=2 leaves no block of 2 to train"):
        run(tmp_path, tokenizer, data, "freeze", freeze_layers=2)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_adapters_load_back_and_merge(tmp_path, tokenizer, data, method):
    result, model, before = run(tmp_path, tokenizer, data, method)
    ids = probe(tokenizer)
    with torch.no_grad():
        trained = model.eval()(ids)
    if method == "qlora":
        assert result["quantized"] == result["adapted"] == 14  # 7 projections x 2 blocks
    assert result["merged"] is None

    def with_adapter(folder: str) -> Transformer:
        """The untrained model (quantized alike for qlora) plus the saved adapter."""
        base = copy.deepcopy(before)
        if method == "qlora":
            quantize_linears(base, 4, 32)
        attach_adapter(base, load_adapter(folder), "ft")
        set_active_adapter(base, "ft")
        return base.eval()

    with torch.no_grad():
        torch.testing.assert_close(with_adapter(result["artifact"])(ids), trained)
    merged_result, _, _ = run(tmp_path / "m", tokenizer, data, method, merge=True)
    merged = load_hf_checkpoint(merged_result["merged"])
    assert Tokenizer.from_file(merged_result["merged"]).vocab_size == tokenizer.vocab_size
    with torch.no_grad():  # qlora merges into the dequantized base: the same function
        torch.testing.assert_close(merged(ids), with_adapter(merged_result["artifact"])(ids),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_virtual_tokens_load_back_and_the_model_is_untouched(tmp_path, tokenizer, data, method):
    result, model, before = run(tmp_path, tokenizer, data, method, prefix_projection=16)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before.state_dict()[name]), name
    tokens = load_virtual_tokens(result["artifact"], model.cfg)
    assert tokens.num_virtual_tokens == 6
    ids = probe(tokenizer)
    cfg = model.cfg
    width = 6 * (cfg.d_model if method == "prompt" else cfg.n_layer * 2 * cfg.kv_heads * cfg.dim_head)
    if method == "ptuning":  # trained through the MLP, saved as its output
        assert result["trainable"] > width
    else:
        assert result["trainable"] == width
    with torch.no_grad():
        assert not torch.allclose(tokens.logits(model, ids), model.eval()(ids))


def test_time_budget_stops_the_run(tmp_path, tokenizer, data):
    result, _, _ = run(tmp_path, tokenizer, data, "lora", max_steps=10_000, max_minutes=0.002)
    assert result["stopped"] == "time" and 1 <= result["steps"] < 10_000


def test_epochs_set_the_length(tmp_path, tokenizer, data):
    result, _, _ = run(tmp_path, tokenizer, data, "lora", max_steps=0, epochs=2, pack=False,
                       eval_every=0)
    assert result["steps"] == 2 * 10  # 38 train examples, batches of 4, one per row
    assert result["stopped"] == "epochs" and result["epochs"] == pytest.approx(2.0)


def test_schedule_warms_up_then_decays():
    cfg = FinetuneConfig(lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, 0.0, cfg, warmup_steps=3) == pytest.approx(0.25)
    assert lr_at(3, 0.0, cfg, warmup_steps=3) == pytest.approx(1.0)
    assert lr_at(10, 0.5, cfg, warmup_steps=3) == pytest.approx(0.55)
    assert lr_at(10, 1.0, cfg, warmup_steps=3) == pytest.approx(0.1)
    assert FinetuneConfig(method="prompt").peak_lr == 3e-2


def test_overrides_are_typed_and_checked():
    cfg = FinetuneConfig().with_overrides(["lr=1e-4", "pack=false", "lora_targets=q_proj,v_proj",
                                           "prompt_init_text=hello world", "max_minutes=2"])
    assert cfg.lr == 1e-4 and cfg.pack is False and cfg.lora_targets == ("q_proj", "v_proj")
    assert cfg.prompt_init_text == "hello world" and cfg.max_minutes == 2.0
    with pytest.raises(ConfigError, match="unknown key learning_rate"):
        FinetuneConfig().with_overrides(["learning_rate=1"])
    with pytest.raises(ConfigError, match="batch_size must be int"):
        FinetuneConfig().with_overrides(["batch_size=two"])


@pytest.mark.parametrize("overrides, message", [
    ({"seq_len": 92}, "seq_len 92 + 6 virtual tokens exceeds the model's context of 96"),
    ({"merge": True}, "merge applies to lora and qlora, not prompt"),
    ({"val_fraction": 1.5}, "val_fraction must be in [0, 1)"),
])
def test_bad_configs_are_one_line_errors(tmp_path, tokenizer, data, overrides, message):
    with pytest.raises(ConfigError) as info:
        run(tmp_path, tokenizer, data, "prompt", **overrides)
    assert message in str(info.value)


def test_refuses_to_overwrite_the_base_model_folder(tmp_path, tokenizer, data):
    model = tiny(tokenizer)
    cfg = FinetuneConfig(out_dir=str(tmp_path), device="cpu", progress=False)
    with pytest.raises(ConfigError, match="is the base model's folder"):
        finetune(model, tokenizer, data, cfg, base_model=str(tmp_path))


def test_activation_checkpointing_gives_the_same_training(tmp_path, tokenizer, data):
    plain, _, _ = run(tmp_path / "a", tokenizer, data, "lora", max_steps=4, eval_every=0)
    recomputed, model, _ = run(tmp_path / "b", tokenizer, data, "lora", max_steps=4,
                               eval_every=0, activation_checkpointing=True)
    assert recomputed["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-5)
    assert not model.checkpoint_blocks  # switched off again once training is over


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_low_memory_fixes_the_mmap_threshold_in_its_own_process():
    """`low_memory` changes the allocator of the whole process, so it is tried in a child."""
    code = ("from pagoda.train.finetune import return_freed_memory; "
            "import sys; sys.exit(0 if return_freed_memory() else 3)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
