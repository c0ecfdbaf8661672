"""Tensor parallelism on CPU (gloo, 2 processes under torchrun): a Megatron-sharded model gives
the unsharded model's logits, gradients and AdamW step, for a GQA Llama and a biased GPT-2, and
the trainer with `train.tensor_parallel` gives one process's losses."""

from __future__ import annotations

import json

import pytest

from pagoda.errors import ConfigError
from pagoda.model.config import ModelConfig
from pagoda.model.transformer import Transformer
from pagoda.train.tensor_parallel import check_divisible
from pagoda.train.trainer import Trainer

SIZES = {"vocab_size": 64, "max_seq_len": 32, "d_model": 32, "n_layer": 2, "n_head": 4,
         "d_ff": 48}
CONFIGS = {
    # GQA (2 kv heads, 1 per rank), SwiGLU, RoPE, RMSNorm, tied embeddings
    "llama": {"preset": "tiny-llama", "n_kv_head": 2},
    # MHA, plain GELU FFN, learned positions, LayerNorm, biases everywhere
    "gpt2": {"preset": "gpt2"},
}

# Each rank builds the same model (same seed), shards a copy over all ranks and records, per
# check, the largest difference from the unsharded model it also runs.
WORKER = """
import copy, gc, json, sys, torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from pagoda.model.config import ModelConfig
from pagoda.model.transformer import Transformer
from pagoda.train.tensor_parallel import parallelize

def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t

def largest(pairs):
    return {name: (full(a) - b).abs().max().item() for name, a, b in pairs}

def main():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sizes, configs = json.loads(sys.argv[1])
    result = {}
    for name, overrides in configs.items():
        cfg = ModelConfig.from_name(overrides.pop("preset"), **sizes, **overrides)
        torch.manual_seed(0)
        ref = Transformer(cfg)
        tp = parallelize(copy.deepcopy(ref), mesh)
        x, y = torch.randint(0, cfg.vocab_size, (2, 2, 16))
        out = {"logits": (tp(x) - ref(x)).abs().max().item(),
               "sharded": sorted(n for n, p in tp.named_parameters() if isinstance(p, DTensor))}
        ref.loss(x, y).backward()
        tp.loss(x, y).backward()
        named = list(zip(dict(tp.named_parameters()).items(), ref.parameters(), strict=True))
        out["grads"] = largest((n, a.grad, b.grad) for (n, a), b in named)
        out["ref_grads"] = {n: b.grad.abs().max().item() for (n, _), b in named}
        for model in (ref, tp):
            torch.optim.AdamW(model.parameters(), lr=1e-2).step()
        out["weights"] = largest((n, a, b) for (n, a), b in named)
        result[name] = out
    json.dump(result, open(f"{sys.argv[2]}.{dist.get_rank()}", "w"))

dist.init_process_group("gloo")
main()
gc.collect()  # free the models, DTensors and mesh while the process group is alive
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory, torchrun) -> list[dict]:
    """What each of the 2 ranks measured (the worker runs once for all checks)."""
    tmp = tmp_path_factory.mktemp("tp")
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    run = torchrun(str(worker), json.dumps([SIZES, CONFIGS]), str(tmp / "result"))
    assert run.returncode == 0, run.stderr[:3000]  # the failing rank's traceback comes first
    return [json.loads((tmp / f"result.{rank}").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("arch", CONFIGS)
def test_sharded_projections_follow_megatron(tp_results, arch):
    sharded = tp_results[0][arch]["sharded"]
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    if arch == "llama":
        projections.append("gate_proj")
    assert {n.split(".")[3] for n in sharded} == set(projections)
    assert all(n.startswith("layers.") for n in sharded)  # embeddings, norms stay replicated


@pytest.mark.parametrize("arch", CONFIGS)
def test_forward_matches_the_unsharded_model(tp_results, arch):
    for rank in tp_results:
        assert rank[arch]["logits"] < 1e-5


@pytest.mark.parametrize("arch", CONFIGS)
def test_gradients_match_the_unsharded_model(tp_results, arch):
    for rank in tp_results:
        assert max(rank[arch]["grads"].values()) < 1e-5
        assert max(rank[arch]["ref_grads"].values()) > 1e-3  # a real gradient was compared


@pytest.mark.parametrize("arch", CONFIGS)
def test_adamw_step_matches_the_unsharded_step(tp_results, arch):
    for rank in tp_results:
        weights, grads = dict(rank[arch]["weights"]), rank[arch]["ref_grads"]
        for name in [n for n in weights if n.endswith("k_proj.bias")]:
            # Softmax ignores a bias added to every key, so this gradient is rounding noise
            # (~1e-9) in both models, and Adam's first step, lr * g / (|g| + eps), can turn
            # different noise into updates up to lr apart. Check the invariance instead.
            assert grads[name] < 1e-7
            del weights[name]
        assert max(weights.values()) < 1e-5


def config(**overrides) -> ModelConfig:
    return ModelConfig.from_name("tiny-llama", **{**SIZES, "n_kv_head": 2, **overrides})


@pytest.mark.parametrize(("overrides", "field"), [
    ({"n_head": 3, "n_kv_head": 3, "d_model": 48}, "n_head=3"),
    ({"n_kv_head": 1}, "n_kv_head=1"),  # MQA: its one key/value head is not replicated
    ({"d_ff": 49}, "d_ff=49"),
])
def test_sizes_that_do_not_split_are_refused(overrides, field):
    model = Transformer.on_meta(config(**overrides))
    with pytest.raises(ConfigError, match=f"divisible by 2.*{field}"):
        check_divisible(model, 2)
    check_divisible(Transformer.on_meta(config()), 2)  # the base sizes do split


def test_mixture_of_experts_is_refused():
    model = Transformer.on_meta(ModelConfig.from_name("tiny-moe", **SIZES))
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        check_divisible(model, 2)


def test_trainer_with_tensor_parallel_matches_one_process(char_shards, tiny_config, torchrun,
                                                         tmp_path):
    """Both ranks read the same batches and hold halves of one model: the losses are those of
    one process, and a tensor-parallel checkpoint resumes to the same losses."""
    sections = {"model": {"dropout": 0.0},
                "train": {"max_steps": 4, "checkpoint_every": 2, "eval_every": 2,
                          "tensor_parallel": True}}
    cfg = tiny_config(char_shards, tmp_path / "tp", **sections)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    run = torchrun("-m", "pagoda.train", str(config))
    assert run.returncode == 0, run.stderr[:3000]  # the failing rank's traceback comes first
    metrics = tmp_path / "tp" / "metrics.jsonl"
    split = [json.loads(line) for line in metrics.read_text().splitlines()]

    one = tiny_config(char_shards, tmp_path / "one", **sections)  # 1 process: TP is a no-op
    Trainer(one).fit()
    single = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").open()]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in split] == pytest.approx([r[key] for r in single], rel=1e-5)
    assert [r["val_loss"] for r in split if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in single if "val_loss" in r], rel=1e-5)

    (tmp_path / "tp" / "latest").write_text("step-000002\n")
    run = torchrun("-m", "pagoda.train", str(config), "--set", "train.resume=true")
    assert run.returncode == 0, run.stderr[:3000]
    resumed = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert resumed == pytest.approx([r["loss"] for r in split], rel=1e-6)


def test_tensor_parallel_with_fsdp_is_refused(char_shards, tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="tensor_parallel and train.fsdp"):
        tiny_config(char_shards, tmp_path, train={"tensor_parallel": True, "fsdp": True})
