"""Hugging Face checkpoint folders: config.json + *.safetensors (sharded or not) in and out.

Loading renames HF tensor names onto ours (and transposes GPT-2's Conv1D matrices); saving does
the reverse, so `transformers` loads what Pagoda trains. A `pagoda_config.json` is written too,
so configs with no HF equivalent (MoE, post-norm decoders, sinusoidal) still round-trip.
BERT and XLM-R folders (BertModel: the all-MiniLM sentence embedder; XLMRobertaModel: e5) load
as encoders, without the pooler that only their pre-training objective uses.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pagoda.errors import WeightsError
from pagoda.model.config import PAGODA_CONFIG, ModelConfig
from pagoda.model.hf_config import XLMR_PAD_ID, config_from_hf, config_to_hf, hf_compatible
from pagoda.model.transformer import Transformer
from pagoda.paths import atomic_write

INDEX = "model.safetensors.index.json"  # sharded checkpoints: tensor name -> shard file

# (HF name pattern, our name) for the llama-like families; {i} is the layer index.
_LLAMA_NAMES = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "final_norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    *[(f"model.layers.{{i}}.self_attn.{p}_proj.{t}", f"layers.{{i}}.attn.{p}_proj.{t}")
      for p in "qkvo" for t in ("weight", "bias")],
    *[(f"model.layers.{{i}}.mlp.{p}_proj.{t}", f"layers.{{i}}.ffn.{p}_proj.{t}")
      for p in ("gate", "up", "down") for t in ("weight", "bias")],
]
# GPT-2 fuses q/k/v into c_attn and stores Linear weights transposed (Conv1D).
_GPT2_NAMES = [
    ("transformer.wte.weight", "embed.weight"),
    ("transformer.wpe.weight", "pos_embed.weight"),
    ("transformer.ln_f.weight", "final_norm.weight"),
    ("transformer.ln_f.bias", "final_norm.bias"),
    ("lm_head.weight", "lm_head.weight"),
    *[(f"transformer.h.{{i}}.{hf}.{t}", f"layers.{{i}}.{ours}.{t}")
      for hf, ours in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm"), ("attn.c_proj", "attn.o_proj"),
                       ("mlp.c_fc", "ffn.up_proj"), ("mlp.c_proj", "ffn.down_proj"))
      for t in ("weight", "bias")],
]
_GPT2_CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
# BERT (BertModel's names; heads such as BertForMaskedLM add a "bert." prefix). Post-norm: the
# attention output's LayerNorm follows the attention residual, the output LayerNorm the FFN's.
_BERT_NAMES = [
    ("embeddings.word_embeddings.weight", "embed.weight"),
    ("embeddings.position_embeddings.weight", "pos_embed.weight"),
    ("embeddings.token_type_embeddings.weight", "type_embed.weight"),
    *[(f"embeddings.LayerNorm.{t}", f"embed_norm.{t}") for t in ("weight", "bias")],
    *[(f"encoder.layer.{{i}}.{hf}.{t}", f"layers.{{i}}.{ours}.{t}")
      for hf, ours in (
          ("attention.self.query", "attn.q_proj"), ("attention.self.key", "attn.k_proj"),
          ("attention.self.value", "attn.v_proj"), ("attention.output.dense", "attn.o_proj"),
          ("attention.output.LayerNorm", "attn_norm"), ("intermediate.dense", "ffn.up_proj"),
          ("output.dense", "ffn.down_proj"), ("output.LayerNorm", "ffn_norm"))
      for t in ("weight", "bias")],
]
_NAMES = {"gpt2": _GPT2_NAMES, "bert": _BERT_NAMES, "xlm-roberta": _BERT_NAMES}
_ENCODER_PREFIX = {"bert": "bert.", "xlm-roberta": "roberta."}  # on models with a task head
_XLMR_SKIPPED = XLMR_PAD_ID + 1  # leading rows of RoBERTa's position table that Pagoda drops


def _name_table(arch: str) -> list[tuple[re.Pattern, str, str]]:
    """Compiled (HF regex, HF template, our template) triples for one architecture."""
    pairs = _NAMES.get(arch, _LLAMA_NAMES)
    return [(re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$"), hf, ours)
            for hf, ours in pairs]


def hf_tensor_name(name: str, arch: str) -> str | None:
    """The HF name of one of our tensor names by the table alone, None where the table has none
    (GPT-2's q/k/v live fused in c_attn); LoRA adapters name their modules with it."""
    for _, hf, ours in _name_table(arch):
        m = re.match("^" + re.escape(ours).replace(r"\{i\}", r"(\d+)") + "$", name)
        if m:
            return hf.replace("{i}", m.group(1)) if m.groups() else hf
    return None


def pagoda_tensor_name(hf_name: str, arch: str) -> str | None:
    """Inverse of `hf_tensor_name`: our name for an HF tensor name, None if the table has none."""
    for pattern, _, ours in _name_table(arch):
        m = pattern.match(hf_name)
        if m:
            return ours.replace("{i}", m.group(1)) if m.groups() else ours
    return None


def hf_to_pagoda(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and for GPT-2 split/transpose) an HF state dict into Pagoda's names."""
    if cfg.arch == "gpt2":
        tensors = {(k if k.startswith(("transformer.", "lm_head")) else "transformer." + k): v
                   for k, v in tensors.items()}
    if cfg.arch in _ENCODER_PREFIX:
        tensors = {k.removeprefix(_ENCODER_PREFIX[cfg.arch]): v for k, v in tensors.items()}
    table = _name_table(cfg.arch)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if cfg.arch == "gpt2" and name.endswith(_GPT2_CONV1D):
            tensor = tensor.t()
        match = re.match(r"^transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)$", name)
        if match:  # (3d, d) fused q/k/v -> three Linear weights
            i, kind = match.groups()
            for part, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                out[f"layers.{i}.attn.{part}_proj.{kind}"] = chunk.contiguous()
            continue
        for pattern, _, ours in table:
            m = pattern.match(name)
            if m:
                out[ours.replace("{i}", m.group(1)) if m.groups() else ours] = tensor.contiguous()
                break
        # anything else is not a weight of ours: GPT-2's attn.bias masks, rotary inv_freq and
        # BERT position_ids buffers, BERT's pooler and pre-training heads (not in the encoder)
    if cfg.arch == "xlm-roberta" and "pos_embed.weight" in out:
        out["pos_embed.weight"] = out["pos_embed.weight"][_XLMR_SKIPPED:]
    return out


def pagoda_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `hf_to_pagoda`: our state dict under the names `transformers` expects."""
    reverse = {}
    for _, hf, ours in _name_table(cfg.arch):
        reverse[re.compile("^" + re.escape(ours).replace(r"\{i\}", r"(\d+)") + "$")] = hf
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        m = re.match(r"^layers\.(\d+)\.attn\.(q|k|v)_proj\.(weight|bias)$", name)
        if cfg.arch == "gpt2" and m:
            i, part, kind = m.groups()
            if part == "q":
                fused = torch.cat([state[f"layers.{i}.attn.{p}_proj.{kind}"] for p in "qkv"])
                out[f"transformer.h.{i}.attn.c_attn.{kind}"] = fused.t() if kind == "weight" else fused
            continue
        for pattern, hf in reverse.items():
            mm = pattern.match(name)
            if mm:
                hf_name = hf.replace("{i}", mm.group(1)) if mm.groups() else hf
                if cfg.arch == "gpt2" and hf_name.endswith(_GPT2_CONV1D):
                    tensor = tensor.t()
                if cfg.arch == "xlm-roberta" and name == "pos_embed.weight":  # rows never read
                    tensor = torch.cat([tensor.new_zeros(_XLMR_SKIPPED, cfg.d_model), tensor])
                out[hf_name] = tensor.contiguous()
                break
        else:
            raise WeightsError(f"no Hugging Face name for tensor {name} of a {cfg.arch} model")
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read {path}: {exc}") from exc


def read_config(folder: Path) -> ModelConfig:
    """The model config of a checkpoint folder (Pagoda's own file first, else config.json)."""
    if (folder / PAGODA_CONFIG).exists():
        return ModelConfig.from_dict(_read_json(folder / PAGODA_CONFIG))
    if not (folder / "config.json").exists():
        raise WeightsError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    return config_from_hf(_read_json(folder / "config.json"), name=folder.name)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index} has no weight_map: the sharded checkpoint is corrupt")
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise WeightsError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder} has no *.safetensors weights")
    return files


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, with readable errors."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(folder):
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{file} is truncated or corrupt ({exc})") from exc
    return tensors


def load_hf_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> Transformer:
    """Build a Transformer from an HF (or Pagoda-saved) checkpoint folder."""
    folder = Path(folder)
    cfg = read_config(folder)
    raw = load_state(folder)
    own = (folder / PAGODA_CONFIG).exists() and not (folder / "config.json").exists()
    state = raw if own else hf_to_pagoda(raw, cfg)
    return build_from_state(cfg, state, dtype, device, source=str(folder))


def build_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                     device: str | torch.device, source: str) -> Transformer:
    """Assign loaded tensors into a meta-built model: no random init, no double allocation."""
    if cfg.tie_embeddings:
        state.setdefault("lm_head.weight", state.get("embed.weight"))
    model = Transformer.on_meta(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - {k for k, v in state.items() if v is not None})
    if missing:
        raise WeightsError(f"{source} lacks {len(missing)} tensors the config needs, "
                           f"e.g. {', '.join(missing[:3])}")
    unused = sorted(set(state) - set(expected))  # silently dropping them would change the model
    if unused:
        raise WeightsError(f"{source} has {len(unused)} tensors the config does not use, "
                           f"e.g. {', '.join(unused[:3])}: the config does not match the weights")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise WeightsError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, "
                               f"the config expects {shape}")
    state = {k: state[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model._build_position_tables()  # re-create the non-persistent tables on the real device
    return model.eval()


def atomic_json(path: Path, data: dict) -> None:
    """Write JSON to a temporary file, fsync it, rename it over `path`."""
    atomic_write(path, json.dumps(data, indent=2))


def atomic_safetensors(tensors: dict[str, torch.Tensor], path: Path,
                       metadata: dict[str, str]) -> None:
    """Write tensors (moved to CPU, contiguous) the same way: temporary file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
              metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_hf_checkpoint(model: Transformer, folder: str | Path) -> Path:
    """Write config.json + model.safetensors (+ pagoda_config.json) atomically, file by file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    if hf_compatible(cfg):
        tensors, metadata = pagoda_to_hf(state, cfg), {"format": "pt"}
        hf_config = config_to_hf(cfg)
        hf_config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
        atomic_json(folder / "config.json", hf_config)
    else:
        if cfg.tie_embeddings:
            state.pop("lm_head.weight")
        tensors, metadata = state, {"format": "pagoda"}
    atomic_safetensors(tensors, folder / "model.safetensors", metadata)
    atomic_json(folder / PAGODA_CONFIG, cfg.to_dict())
    _remove_stale(folder, keep_config_json=hf_compatible(cfg))
    return folder


def _remove_stale(folder: Path, keep_config_json: bool) -> None:
    """Delete what an earlier save left that loaders would read instead of the new weights."""
    index = folder / INDEX
    if index.exists():  # an earlier sharded save: its index and shards
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, json.JSONDecodeError, AttributeError):
            shards = set()
        for name in shards - {"model.safetensors"}:
            (folder / name).unlink(missing_ok=True)
        index.unlink()
    if not keep_config_json:  # an earlier HF-layout save: would be read as this model's config
        (folder / "config.json").unlink(missing_ok=True)
