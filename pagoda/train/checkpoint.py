"""Atomic training checkpoints that are also ready-to-use model folders.

Layout of `out_dir`::

    out_dir/step-000100/   config.json (when HF has the architecture) + pagoda_config.json
                           model.safetensors, tokenizer.json (+ tokenizer_config.json)
                           trainer_state.pt   (optimizer, step, RNG states, loader positions, config)
    out_dir/latest         the name of the newest complete checkpoint folder

A folder is written under a temporary name, every file fsynced, then renamed into place; only
then is `latest` replaced (temp file + fsync + rename). A kill -9 at any moment leaves either
the old or the new checkpoint as `latest`, never a half-written one; leftover temp folders are
swept at the next save. `pagoda chat/serve/params` load a step folder directly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from pagoda.errors import ConfigError
from pagoda.model.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from pagoda.model.transformer import Transformer
from pagoda.paths import fsync_path

STATE = "trainer_state.pt"
LATEST = "latest"
TEMP_PREFIX = ".tmp-"


def step_folder(step: int) -> str:
    return f"step-{step:06d}"


def _write_latest(out_dir: Path, name: str) -> None:
    temp = out_dir / f"{TEMP_PREFIX}{LATEST}"
    with open(temp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, out_dir / LATEST)
    fsync_path(out_dir)


def save_checkpoint(out_dir: str | Path, step: int, model: Transformer, state: dict[str, Any],
                    tokenizer_path: Path | None = None, keep: int = 2) -> Path:
    """Write `out_dir/step-NNNNNN` atomically, point `latest` at it, keep the newest `keep`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{TEMP_PREFIX}*"):  # a crash mid-save left it behind
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    name = step_folder(step)
    temp = out_dir / f"{TEMP_PREFIX}{name}"
    save_hf_checkpoint(model, temp)
    if tokenizer_path is not None and tokenizer_path.is_file():
        for file in (tokenizer_path, tokenizer_path.with_name("tokenizer_config.json")):
            if file.is_file():
                shutil.copyfile(file, temp / file.name)
    torch.save(state, temp / STATE)
    for file in temp.iterdir():
        fsync_path(file)
    final = out_dir / name
    if final.exists():  # the same step saved again (a resumed run): replace it
        shutil.rmtree(final)
    os.replace(temp, final)
    fsync_path(out_dir)
    _write_latest(out_dir, name)
    for old in sorted(out_dir.glob("step-*"))[:-keep]:
        if old.name != name:
            shutil.rmtree(old)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The folder `latest` names, or None when the run has no checkpoint yet."""
    out_dir = Path(out_dir)
    try:
        name = (out_dir / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    folder = out_dir / name
    if not (folder / STATE).is_file():
        raise ConfigError(f"{out_dir / LATEST} names {name}, which has no {STATE}; pass "
                          "train.resume a checkpoint folder")
    return folder


def find_resume(resume: bool | str, out_dir: str | Path) -> Path | None:
    """What `train.resume` points at: false -> None; true -> out_dir's latest (None if there
    is none yet, so a preempted job can always pass true); a path -> that checkpoint."""
    if resume is False:
        return None
    if resume is True:
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if (path / LATEST).is_file():
        return latest_checkpoint(path)
    if not (path / STATE).is_file():
        raise ConfigError(f"train.resume: {path} is not a checkpoint (no {STATE})")
    return path


def load_trainer_state(folder: Path, model_config: dict[str, Any]) -> dict[str, Any]:
    """The trainer state of a checkpoint, refused when it was made for another model."""
    state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    saved = state["model_config"]
    changed = sorted(k for k in set(saved) | set(model_config)
                     if k not in ("name", "extra") and saved.get(k) != model_config.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {model_config.get(k)!r}" for k in changed[:4])
        raise ConfigError(f"checkpoint {folder} was trained with another model config ({diffs}); "
                          "resume with the same model section or start a new out_dir")
    return state


def load_weights(folder: Path, model: Transformer) -> None:
    """Copy a checkpoint's weights (its HF-layout export) into `model` in place."""
    saved = load_hf_checkpoint(folder, dtype=model.dtype, device="cpu")
    with torch.no_grad():
        model.load_state_dict(saved.state_dict())
