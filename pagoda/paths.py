"""Where Pagoda keeps its caches (`$PAGODA_HOME`, default `~/.cache/pagoda`), and making what it
writes there durable."""

import os
from pathlib import Path


def pagoda_home() -> Path:
    """The root of every cache Pagoda writes (models, knowledge bases, runs)."""
    return Path(os.environ.get("PAGODA_HOME", Path.home() / ".cache" / "pagoda")).expanduser()


def models_dir() -> Path:
    """Folder holding one sub-folder per pulled model."""
    return pagoda_home() / "models"


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (after a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
