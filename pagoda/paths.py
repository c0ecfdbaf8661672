"""Where Pagoda keeps its caches (`$PAGODA_HOME`, default `~/.cache/pagoda`), and making what it
writes there durable."""

import os
import tempfile
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


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` through a hidden temp file in the same folder, fsync, rename:
    a crash leaves the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
