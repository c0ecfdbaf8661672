"""The training loop end to end on a 2-layer model: metrics, exact resume, checkpoints that
`load_model` and `pagoda params` read, and refusal of another model's checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pagoda.cli import main
from pagoda.errors import ConfigError
from pagoda.hub.loader import load_model
from pagoda.infer.generate import generate_tokens
from pagoda.infer.sampling import SamplingParams
from pagoda.train import checkpoint, pretrain
from pagoda.train.trainer import Trainer

RESUMABLE = {"train": {"max_steps": 6, "grad_accum": 2, "eval_every": 2, "checkpoint_every": 3,
                       "sample_every": 3, "sample_tokens": 8}}


def losses(out_dir):
    return [(r["step"], r["loss"], r.get("val_loss")) for r in
            map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def straight(char_shards, tiny_config, tmp_path_factory):
    """Six steps in one go (dropout on, 2 micro-batches, eval, samples, checkpoint at 3 and 6)."""
    out = tmp_path_factory.mktemp("straight")
    summary = pretrain(tiny_config(char_shards, out, **RESUMABLE))
    return out, summary


def test_run_writes_metrics_plot_and_checkpoints(straight):
    out, summary = straight
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {"loss", "lr", "grad_norm", "tok_s", "mfu"} <= set(records[0])
    assert "val_ppl" in records[1] and "sample" in records[2]
    assert (out / "loss.png").stat().st_size > 0
    assert (out / "latest").read_text().strip() == "step-000006"
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000003", "step-000006"]
    assert summary["steps"] == 6 and summary["val_loss"] == records[-1]["val_loss"]


def test_resume_continues_the_same_run_exactly(straight, char_shards, tiny_config, tmp_path):
    """Copy the step-3 checkpoint (and the whole metrics log, as after a crash at step 5) into a
    new run folder; resuming must reproduce steps 4..6 bit for bit."""
    out, _ = straight
    shutil.copytree(out / "step-000003", tmp_path / "step-000003")
    (tmp_path / "latest").write_text("step-000003\n")
    shutil.copy(out / "metrics.jsonl", tmp_path / "metrics.jsonl")
    resumed = tiny_config(char_shards, tmp_path, **RESUMABLE)
    resumed.train.resume = True
    pretrain(resumed)
    assert losses(tmp_path) == losses(out)


def test_checkpoint_loads_as_a_model_and_generates(straight, capsys):
    out, _ = straight
    loaded = load_model(str(out / "step-000006"), device="cpu", dtype="fp32")
    prompt = loaded.tokenizer.encode("the ")
    steps = list(generate_tokens(loaded.model, [prompt], [SamplingParams(temperature=0,
                                                                         max_tokens=5)]))
    assert len(steps) == 5
    assert main(["params", str(out / "step-000006"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] > 0


def test_a_crash_mid_save_leaves_the_last_checkpoint(straight, char_shards, tiny_config, tmp_path,
                                                     monkeypatch):
    out, _ = straight
    run = tmp_path / "run"
    shutil.copytree(out, run)
    trainer = Trainer(tiny_config(char_shards, run, train={"max_steps": 6, "resume": True}))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("kill -9 while writing trainer_state.pt")

    monkeypatch.setattr(checkpoint.torch, "save", killed)
    trainer.step = 7
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert (run / ".tmp-step-000007").is_dir()  # the half-written folder
    assert checkpoint.latest_checkpoint(run) == run / "step-000006"
    assert load_model(str(run / "step-000006"), device="cpu").model.cfg.n_layer == 2
    monkeypatch.undo()
    trainer.save()  # the next save sweeps the leftover
    assert not (run / ".tmp-step-000007").exists()
    assert checkpoint.latest_checkpoint(run) == run / "step-000007"


def test_a_checkpoint_of_another_model_is_refused(straight, char_shards, tiny_config, tmp_path):
    out, _ = straight
    cfg = tiny_config(char_shards, tmp_path, train={"resume": str(out / "step-000003")},
                      model={"n_layer": 3})
    with pytest.raises(ConfigError, match=r"another model config \(n_layer: 2 -> 3\)"):
        Trainer(cfg)


def test_resume_path_must_be_a_checkpoint(char_shards, tiny_config, tmp_path):
    cfg = tiny_config(char_shards, tmp_path, train={"resume": str(tmp_path)})
    with pytest.raises(ConfigError, match="is not a checkpoint"):
        Trainer(cfg)


def test_masked_lm_on_an_encoder(char_shards, tiny_config, tmp_path):
    vocab = json.loads((char_shards / "index.json").read_text())["vocab_size"]
    cfg = tiny_config(char_shards, tmp_path,
                      model={"causal": False, "vocab_size": vocab + 1},
                      train={"objective": "mlm", "mask_token_id": vocab, "max_steps": 4,
                             "activation_checkpointing": True, "dtype": "bfloat16",
                             "sample_every": 2},
                      optim={"name": "lamb"}, schedule={"kind": "wsd"})
    summary = pretrain(cfg)
    assert summary["steps"] == 4 and torch.isfinite(torch.tensor(summary["val_loss"]))
    assert "sample" not in summary  # encoders are not sampled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, compile", [("bfloat16", True), ("float16", False)])
def test_cuda_mixed_precision_training(char_shards, tiny_config, tmp_path, dtype, compile):
    """On a GPU, bf16 autocast (compiled) and fp16 with its grad scaler train: the loss falls
    and the first step's loss matches the fp32 CPU run's (same seed, same batch)."""
    def run(device, dtype, compile, out):
        cfg = tiny_config(char_shards, tmp_path / out, model={"dropout": 0.0},
                          train={"device": device, "dtype": dtype, "compile": compile,
                                 "max_steps": 30, "eval_every": 0})
        pretrain(cfg)
        return [json.loads(line)["loss"]
                for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    cpu, gpu = run("cpu", "float32", False, "cpu"), run("cuda", dtype, compile, dtype)
    assert abs(gpu[0] - cpu[0]) < 2e-2
    assert gpu[-1] < gpu[0] - 0.5
