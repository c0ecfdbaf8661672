"""Name or path in, ready model and tokenizer out: the one call every storey uses to load."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pagoda.errors import WeightsError
from pagoda.hub.store import model_file, resolve
from pagoda.model.device import pick_device, pick_dtype
from pagoda.model.gguf_io import load_gguf
from pagoda.model.hf_checkpoint import load_hf_checkpoint
from pagoda.model.transformer import Transformer
from pagoda.tokenizer import Tokenizer

# sentence-transformers' settings file in an embedder's folder (max_seq_length, lower-casing).
SENTENCE_CONFIG = "sentence_bert_config.json"


@dataclass
class LoadedModel:
    """A model with the tokenizer that belongs to it and where it came from."""

    name: str
    path: Path
    model: Transformer
    tokenizer: Tokenizer
    # The longest input the model was trained to read, when shorter than its position table:
    # sentence embedders truncate there (all-MiniLM: 256 of 512). None: cfg.max_seq_len.
    max_tokens: int | None = None


def load_model(name_or_path: str, *, device: str | None = None, dtype: str | None = None,
               pull: bool = True) -> LoadedModel:
    """Resolve (pulling on first use), then load a GGUF file or an HF checkpoint folder."""
    path = model_file(resolve(name_or_path, pull_if_missing=pull))
    dev = pick_device(device)
    torch_dtype = pick_dtype(dev, dtype)
    if path.suffix == ".gguf":
        model, meta = load_gguf(path, dtype=torch_dtype, device=dev)
        return LoadedModel(name=name_or_path, path=path, model=model,
                           tokenizer=Tokenizer.from_gguf_metadata(meta))
    return LoadedModel(name=name_or_path, path=path,
                       model=load_hf_checkpoint(path, dtype=torch_dtype, device=dev),
                       tokenizer=Tokenizer.from_file(path), max_tokens=sentence_max_tokens(path))


def sentence_max_tokens(folder: Path) -> int | None:
    """sentence-transformers' max_seq_length, when the folder is a sentence embedder."""
    file = folder / SENTENCE_CONFIG
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text()).get("max_seq_length")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise WeightsError(f"cannot read {file}: {exc}") from exc
    if value is not None and (not isinstance(value, int) or value < 1):
        raise WeightsError(f"{file}: max_seq_length must be a positive integer, got {value!r}")
    return value
