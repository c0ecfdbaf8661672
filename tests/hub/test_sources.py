import re
from pathlib import Path

import pytest

from pagoda.errors import ModelNotFoundError
from pagoda.hub.sources import (
    KNOWN_MODELS,
    HFHubSource,
    LocalSource,
    PyPIWheelSource,
    find_source,
)


def _source(**where) -> PyPIWheelSource:
    return PyPIWheelSource("pkg", "1.0", "0" * 64, kind="hf", description="test", **where)


def test_known_models_are_pinned_and_described():
    assert {"smollm2-135m-instruct", "minilm-l6"} <= set(KNOWN_MODELS)
    for source in KNOWN_MODELS.values():
        assert re.fullmatch(r"[0-9a-f]{64}", source.wheel_sha256)
        assert source.description and "\n" not in source.description
        assert source.version in source.origin


def test_single_member_lands_at_top_level():
    source = _source(member="pkg/model.Q4.gguf")
    assert source.target("pkg/model.Q4.gguf") == "model.Q4.gguf"
    assert source.target("pkg/__init__.py") is None


def test_members_prefix_keeps_relative_layout_and_skips_the_rest():
    source = _source(members_prefix="pkg/model")
    assert source.target("pkg/model/config.json") == "config.json"
    assert source.target("pkg/model/1_Pooling/config.json") == "1_Pooling/config.json"
    assert source.target("pkg/model/") is None
    assert source.target("pkg/modelx/config.json") is None
    assert source.target("pkg-1.0.dist-info/RECORD") is None


def test_member_and_prefix_are_exclusive():
    with pytest.raises(ValueError):
        _source()
    with pytest.raises(ValueError):
        _source(member="a", members_prefix="b/")


def test_known_name():
    assert find_source("minilm-l6") is KNOWN_MODELS["minilm-l6"]


def test_hf_names_parse_with_optional_revision():
    assert find_source("hf:HuggingFaceTB/SmolLM2-135M") == HFHubSource("HuggingFaceTB/SmolLM2-135M")
    assert find_source("hf:org/name@v1.0") == HFHubSource("org/name", "v1.0")
    with pytest.raises(ModelNotFoundError, match="hf:ORG/NAME"):
        find_source("hf:just-a-name")


def test_unknown_name_lists_known_names():
    with pytest.raises(ModelNotFoundError) as err:
        find_source("gpt-5")
    message = str(err.value)
    assert "gpt-5" in message and "\n" not in message
    for name in KNOWN_MODELS:
        assert name in message


def test_local_gguf_file_and_hf_folder(tmp_path: Path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert find_source(str(gguf)) == LocalSource(gguf)
    assert find_source(str(folder)) == LocalSource(folder)


def test_local_path_that_is_not_a_model(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="does not look like a model"):
        find_source(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="does not look like a model"):
        find_source(str(tmp_path / "notes.txt"))


def test_missing_path_says_so(tmp_path: Path):
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        find_source(str(tmp_path / "missing.gguf"))
