"""GGUF files (llama.cpp / Ollama): hyper-parameters, tensors, dequantization, and saving.

The `gguf` package parses the file and dequantizes every ggml type (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, K-quants) with numpy; we map the llama.cpp tensor names onto ours and undo the q/k row
permutation that llama.cpp's converter applies for its interleaved RoPE.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pagoda.errors import WeightsError
from pagoda.model.config import ModelConfig
from pagoda.model.hf_checkpoint import build_from_state
from pagoda.model.transformer import Transformer

SUPPORTED_ARCHS = ("llama", "qwen2")
_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "final_norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    **{f"attn_{g}.{t}": f"attn.{p}_proj.{t}" for g, p in
       (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")) for t in ("weight", "bias")},
    **{f"ffn_{p}.weight": f"ffn.{p}_proj.weight" for p in ("gate", "up", "down")},
}


def _reader(path: Path):
    """Open a GGUF file, turning format errors and truncation into one readable line."""
    import gguf

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise WeightsError(f"{path} is not a GGUF file (bad magic bytes)")
        return gguf.GGUFReader(path)
    except WeightsError:
        raise
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc}") from exc
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise WeightsError(f"{path} is truncated or corrupt: {exc}") from exc


def read_gguf_metadata(path: str | Path, reader: Any = None) -> dict[str, Any]:
    """Every key/value of the GGUF header as plain Python values (str, int, float, lists)."""
    reader = reader or _reader(Path(path))
    meta: dict[str, Any] = {}
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY and field.types[-1] == gguf.GGUFValueType.STRING:
            # contents() is ~40x slower on 50k-entry vocabularies; decode the raw parts directly
            meta[key] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            continue
        value = field.contents()
        meta[key] = value.tolist() if isinstance(value, np.ndarray) else value
    return meta


def config_from_gguf(meta: dict[str, Any], name: str, has_output: bool) -> ModelConfig:
    """ModelConfig from GGUF hyper-parameters (`llama.*`, `qwen2.*` keys)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise WeightsError(f"GGUF architecture {arch!r} is not supported "
                           f"(supported: {', '.join(SUPPORTED_ARCHS)})")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise WeightsError(f"GGUF file lacks {arch}.{key}")
        return value

    n_head = get("attention.head_count")
    d_model = get("embedding_length")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
    return ModelConfig(
        name=name, arch=arch, vocab_size=vocab, max_seq_len=get("context_length"),
        d_model=d_model, n_layer=get("block_count"), n_head=n_head,
        n_kv_head=get("attention.head_count_kv", n_head),
        head_dim=head_dim if head_dim and head_dim != d_model // n_head else None,
        d_ff=get("feed_forward_length"), rope_theta=float(get("rope.freq_base", 10000.0)),
        norm="rmsnorm", norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        activation="silu", gated_ffn=True, attn_qkv_bias=arch == "qwen2",
        tie_embeddings=not has_output, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        extra={"gguf_file_type": meta.get("general.file_type")})


def gguf_config(path: str | Path) -> ModelConfig:
    """The model config of a GGUF file, read from its header alone (no tensors loaded)."""
    path = Path(path)
    reader = _reader(path)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return config_from_gguf(read_gguf_metadata(path, reader), path.stem, has_output)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half pairs)."""
    rows = w.shape[0] // n_head // 2
    return w.reshape(n_head, rows, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> tuple[Transformer, dict[str, Any]]:
    """Build a Transformer from a GGUF file; returns it with the file's metadata."""
    from gguf.quants import dequantize

    path = Path(path)
    reader = _reader(path)
    meta = read_gguf_metadata(path, reader)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    cfg = config_from_gguf(meta, name=path.stem, has_output=has_output)
    state: dict[str, torch.Tensor] = {}
    try:
        for t in reader.tensors:
            m = re.match(r"^blk\.(\d+)\.(.+)$", t.name)
            key = m.group(2) if m else t.name
            array = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            if key == "rope_freqs.weight":  # Llama 3.1+: per-frequency divisors of long-context RoPE
                cfg = cfg.replace(rope_scaling={"freq_factors": array.astype(float).tolist()})
            if key not in _NAMES:
                continue
            if cfg.arch == "llama" and key in ("attn_q.weight", "attn_k.weight"):
                array = _unpermute(array, cfg.n_head if key == "attn_q.weight" else cfg.kv_heads)
            ours = f"layers.{m.group(1)}.{_NAMES[key]}" if m else _NAMES[key]
            state[ours] = torch.from_numpy(np.array(array, dtype=np.float32))  # own, writable
    except (ValueError, IndexError, NotImplementedError) as exc:
        raise WeightsError(f"{path}: cannot read tensor {t.name}: {exc}") from exc
    return build_from_state(cfg, state, dtype, device, source=str(path)), meta
