"""What every benchmark script shares: the machine a run happened on, atomic JSON results, and
matplotlib in headless mode (optional: without it a script skips its PNG)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def machine_info(threads: int) -> dict[str, Any]:
    """CPU, cores, library versions, threads and date of this run."""
    import torch

    import pagoda
    from pagoda.infer.kernels import native_available

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "pagoda": pagoda.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pagoda_native_kernels": native_available(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_json(result: dict, path: Path) -> Path:
    """Write a results file atomically (temp file, fsync, rename)."""
    from pagoda.paths import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(result, indent=2) + "\n")
    return path


def pyplot(png_name: str):
    """matplotlib.pyplot with the Agg backend, or None (with a note) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, skipping {png_name}", file=sys.stderr)
        return None
    return plt


def save_png(fig, path: Path) -> Path:
    """Save a matplotlib figure atomically and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    fig.clf()
    os.replace(tmp, path)
    return path
