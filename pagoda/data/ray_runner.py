"""`pagoda data prepare` on Ray Data, for corpora beyond one machine (`pip install 'pagoda[ray]'`).

What runs on the cluster is the per-record work of both passes, the same `FirstPass` and
`SecondPass` objects the local worker processes run: cleaning, the quality rules, the dedup
signatures and line hashes, then boilerplate removal and PII masking: independent per record,
so they scale out. What stays on the driver is collection (reading files, crawling), the dedup index, the
boilerplate line counts, balancing and writing: dedup is first-seen-wins, so which of two copies
survives depends on one global order that a single index has to see in full, and the outputs are
written in that order so they are byte-identical to a local run's.

The driver streams batches (`pipeline.batches`) to the cluster in windows of a few per cluster
CPU: one small Ray Dataset per window (two running at once), one batch per block and per task,
results read back in input order (`preserve_order`), so memory stays bounded whatever the
corpus size. Batches and results cross as pickled bytes, so Arrow never has to type Records or
numpy arrays. Every Ray node needs pagoda installed (the same version as the driver).
"""

from __future__ import annotations

import os
import pickle
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

from pagoda.data.pipeline import PipelineConfig, batches, prepare
from pagoda.data.record import Record
from pagoda.errors import ConfigError

WINDOW_PER_CPU = 4  # batches per window per cluster CPU (two windows run at once)


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks its dependencies)
    except ImportError as error:
        raise ConfigError(f"--ray needs Ray Data, which is not installed ({error}); "
                          "install it with: pip install 'pagoda[ray]'") from None
    return ray


def connect(workers: int) -> bool:
    """Join the cluster at RAY_ADDRESS, or start a local Ray with `workers` CPUs, unless this
    process is already connected. True when this call started or joined it."""
    ray = _ray()
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto")
    else:
        ray.init(num_cpus=max(1, workers), include_dashboard=False)
    return True


_cached: tuple[bytes, Callable] | None = None  # (work's object id, work) in this Ray worker


def _apply(table: Any, work_ref: Any) -> Any:
    """One batch on a Ray worker: unpickle the records, run `work`, pickle the results."""
    global _cached
    import pyarrow as pa
    import ray

    if _cached is None or _cached[0] != work_ref.binary():
        _cached = (work_ref.binary(), ray.get(work_ref))
    results = [pickle.dumps(_cached[1](pickle.loads(batch)), pickle.HIGHEST_PROTOCOL)
               for batch in table.column("batch").to_pylist()]
    return pa.table({"results": pa.array(results, pa.large_binary())})


def _run_window(ray: Any, window: list[bytes], work_ref: Any) -> list[bytes]:
    """One window of pickled batches through `work` on the cluster: pickled results, in order."""
    ds = ray.data.from_items([{"batch": batch} for batch in window],
                             override_num_blocks=len(window))
    context = ds.context  # this dataset's copy: the process-wide settings stay as they were
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    done = ds.map_batches(_apply, batch_size=1, batch_format="pyarrow", fn_args=(work_ref,),
                          num_cpus=1)
    return [payload for table in done.iter_batches(batch_size=None, batch_format="pyarrow")
            for payload in table.column("results").to_pylist()]


def ray_map(work: Callable[[list], list], records: Iterable[Record],
            workers: int) -> Iterator[Any]:
    """A `pipeline.Mapper` on Ray Data: `work` over `batches(records)` on the cluster (local
    Ray with `workers` CPUs if none is connected), results in input order. Two windows run at
    once, so the cluster stays busy while the driver reads the next one's input."""
    ray = _ray()
    connect(workers)
    work_ref = ray.put(work)  # shipped once: the driver's objects keep changing (pass one)
    size = WINDOW_PER_CPU * (int(ray.cluster_resources().get("CPU", workers)) or 1)
    stream = batches(records)
    pending: deque[Future[list[bytes]]] = deque()
    pool = ThreadPoolExecutor(2, thread_name_prefix="pagoda-ray")
    try:
        while window := [pickle.dumps(batch, pickle.HIGHEST_PROTOCOL)
                         for batch in islice(stream, size)]:
            pending.append(pool.submit(_run_window, ray, window, work_ref))
            if len(pending) >= 2:
                for payload in pending.popleft().result():
                    yield from pickle.loads(payload)
        while pending:
            for payload in pending.popleft().result():
                yield from pickle.loads(payload)
    finally:
        pool.shutdown(cancel_futures=True)


def prepare_on_ray(inputs: list[str | Path], out_dir: str | Path,
                   config: PipelineConfig | None = None, *,
                   progress: bool = False) -> dict[str, Any]:
    """`pipeline.prepare` with the per-record stages on Ray (the cluster at RAY_ADDRESS, else
    a local Ray with `output.workers` CPUs, shut down again at the end)."""
    config = config or PipelineConfig()
    started = connect(config.output.workers or os.cpu_count() or 1)
    try:
        return prepare(inputs, out_dir, config, progress=progress, mapper=ray_map)
    finally:
        if started:
            _ray().shutdown()
