"""torchrun on CPU (gloo, 2 processes): DDP computes the same loss and gradients as one process
with the same global batch, and FSDP2 checkpoints save and resume."""

from __future__ import annotations

import json

import pytest
import torch

from pagoda.data.loader import BatchLoader
from pagoda.train.trainer import Trainer

# One optimizer step per rank; the gradients the optimizer sees are saved for comparison.
WORKER = """
import gc, json, sys, torch
import torch.distributed as dist
from pagoda.train.config import load_config
from pagoda.train.trainer import Trainer

def main():
    trainer = Trainer(load_config(data=json.loads(sys.argv[1])))
    grads = []
    trainer.optimizer.register_step_pre_hook(
        lambda *_: grads.extend(p.grad.clone() for p in trainer.model.parameters()))
    loss, norm = trainer.train_step()
    if trainer.dist.rank == 0:
        torch.save({"loss": loss, "norm": norm, "grads": grads}, sys.argv[2])
    dist.barrier()

main()
gc.collect()  # free the trainer (its hook closes over it) while the process group is alive
dist.destroy_process_group()
"""


class GlobalBatch:
    """Micro-batch k of rank 0 and rank 1 side by side: what the 2 processes see together."""

    def __init__(self, shards, block_size: int, batch_size: int, seed: int) -> None:
        self.ranks = [BatchLoader(shards, block_size, batch_size, seed, rank=r, world_size=2)
                      for r in (0, 1)]

    def next(self):
        (x0, y0), (x1, y1) = (loader.next() for loader in self.ranks)
        return torch.cat([x0, x1]), torch.cat([y0, y1])


def test_ddp_matches_one_process_with_the_same_global_batch(char_shards, tiny_config, torchrun,
                                                            tmp_path):
    cfg = tiny_config(char_shards, tmp_path / "ddp", model={"dropout": 0.0},
                      train={"grad_accum": 2})
    result, worker = tmp_path / "ddp.pt", tmp_path / "worker.py"
    worker.write_text(WORKER)
    run = torchrun(str(worker), json.dumps(cfg.to_dict()), str(result))
    assert run.returncode == 0, run.stderr[:3000]  # the failing rank's traceback comes first
    ddp = torch.load(result)

    single = Trainer(tiny_config(char_shards, tmp_path / "one", model={"dropout": 0.0},
                                 train={"grad_accum": 2}, data={"batch_size": 8}))
    single.loader = GlobalBatch(single.train_data, 16, 4, cfg.train.seed)
    grads = []
    single.optimizer.register_step_pre_hook(
        lambda *_: grads.extend(p.grad.clone() for p in single.model.parameters()))
    loss, norm = single.train_step()
    assert ddp["loss"] == pytest.approx(loss, rel=1e-5)
    assert ddp["norm"] == pytest.approx(norm, rel=1e-4)
    for a, b in zip(ddp["grads"], grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fsdp_checkpoints_save_and_resume(char_shards, tiny_config, torchrun, tmp_path):
    cfg = tiny_config(char_shards, tmp_path, train={"max_steps": 4, "checkpoint_every": 2,
                                                    "fsdp": True, "eval_every": 2})
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    run = torchrun("-m", "pagoda.train", str(config))
    assert run.returncode == 0, run.stderr[:3000]  # the failing rank's traceback comes first
    straight = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "latest").write_text("step-000002\n")
    run = torchrun("-m", "pagoda.train", str(config), "--set", "train.resume=true")
    assert run.returncode == 0, run.stderr[:3000]  # the failing rank's traceback comes first
    resumed = (tmp_path / "metrics.jsonl").read_text().splitlines()
    loss = [json.loads(line)["loss"] for line in straight]
    assert [json.loads(line)["loss"] for line in resumed] == pytest.approx(loss, rel=1e-6)
