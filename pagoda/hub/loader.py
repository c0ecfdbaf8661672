"""Name or path in, ready model and tokenizer out: the one call every storey uses to load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pagoda.hub.store import model_file, resolve
from pagoda.model.device import pick_device, pick_dtype
from pagoda.model.gguf_io import load_gguf
from pagoda.model.hf_checkpoint import load_hf_checkpoint
from pagoda.model.transformer import Transformer
from pagoda.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """A model with the tokenizer that belongs to it and where it came from."""

    name: str
    path: Path
    model: Transformer
    tokenizer: Tokenizer


def load_model(name_or_path: str, *, device: str | None = None, dtype: str | None = None,
               pull: bool = True) -> LoadedModel:
    """Resolve (pulling on first use), then load a GGUF file or an HF checkpoint folder."""
    path = model_file(resolve(name_or_path, pull_if_missing=pull))
    dev = pick_device(device)
    torch_dtype = pick_dtype(dev, dtype)
    if path.suffix == ".gguf":
        model, meta = load_gguf(path, dtype=torch_dtype, device=dev)
        tokenizer = Tokenizer.from_gguf_metadata(meta)
    else:
        model = load_hf_checkpoint(path, dtype=torch_dtype, device=dev)
        tokenizer = Tokenizer.from_file(path)
    return LoadedModel(name=name_or_path, path=path, model=model, tokenizer=tokenizer)
