"""`pagoda data prepare`: collect → clean → quality → dedup → boilerplate → PII → balance → output.

The stages are the plain functions of their modules; this one runs them over a corpus:

- pass one streams the collected records through cleaning, the quality rules and the dedup
  signatures in worker processes (in input order, a bounded number of batches in flight), then
  through the deduplicator in this process; survivors go to a spool file on disk and their line
  hashes to the boilerplate counter;
- pass two streams the spool through boilerplate removal and PII masking in workers, then the
  mixing weights here, into `data.jsonl`.

Boilerplate lines are counted over deduplicated documents only, so a corpus full of copies does
not make its own text look like boilerplate. Memory holds hashes and signatures per kept
document, never text. Everything is written into a temporary folder beside `--out` that
replaces it at the end, so a killed run leaves the previous output (or none) and no partial
files; the same inputs and config give byte-identical `data.jsonl`, manifest and shards.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagoda.configfile import (
    apply_overrides,
    build_section,
    check_sections,
    field_type,
    read_yaml,
)
from pagoda.data.clean import BoilerplateLines, CleanConfig, CleanStep
from pagoda.data.collect import CollectConfig, CollectReport, collect
from pagoda.data.crawl import CrawlConfig
from pagoda.data.dedup import DedupConfig, Deduplicator, signatures
from pagoda.data.pii import PiiConfig, pii_step
from pagoda.data.quality import QualityConfig, QualityStep
from pagoda.data.record import Drop, Record
from pagoda.errors import ConfigError
from pagoda.paths import atomic_write, fsync_path

if TYPE_CHECKING:
    from pagoda.tokenizer import Tokenizer

BATCH_CHARS = 1 << 18  # characters per worker task: IPC and numpy costs shared, memory bounded
STAGES = ("collect", "clean", "quality", "dedup", "boilerplate", "pii", "balance")


@dataclass(frozen=True)
class StageSwitches:
    """Which optional stages run (collection and output always do)."""

    clean: bool = True
    quality: bool = True
    dedup: bool = True
    boilerplate: bool = True
    pii: bool = True


@dataclass(frozen=True)
class BalanceConfig:
    """Mixing weights across sources: `weights` maps a glob over record sources to a sampling
    weight. 0.5 keeps about half of those records, 2 writes each twice, 1.5 each once and half
    of them twice. The first matching pattern wins; other records keep weight 1. Which records
    are kept or repeated depends only on their content hash and `seed`."""

    weights: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.weights.items() if not 0 <= v <= 100}
        if bad:
            raise ConfigError(f"weights must be between 0 and 100, got {bad}")


@dataclass(frozen=True)
class OutputConfig:
    """What is written besides data.jsonl: token shards when `tokenizer` names a tokenizer
    (a folder, tokenizer.json or a pulled model), in the training storey's format."""

    tokenizer: str | None = None
    val_fraction: float = 0.005
    workers: int = 0  # worker processes; 0: one per core

    def __post_init__(self) -> None:  # checked now, not after the hours the stages take
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0 (0: one per core), got {self.workers}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class PipelineConfig:
    """The whole pipeline; each section is its stage's own config (see docs/data.md)."""

    collect: CollectConfig = field(default_factory=CollectConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    stages: StageSwitches = field(default_factory=StageSwitches)
    output: OutputConfig = field(default_factory=OutputConfig)


SECTIONS: dict[str, type] = {"collect": CollectConfig, "crawl": CrawlConfig,
                             "clean": CleanConfig, "quality": QualityConfig,
                             "dedup": DedupConfig, "pii": PiiConfig, "balance": BalanceConfig,
                             "stages": StageSwitches, "output": OutputConfig}


def load_pipeline_config(path: str | Path | None = None,
                         overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """A YAML file with any of the sections in SECTIONS (each optional), plus overrides."""
    data = read_yaml(Path(path)) if path else {}
    apply_overrides(data, overrides, lambda s, k: field_type(SECTIONS[s], k)
                    if s in SECTIONS else Any)
    check_sections(data, list(SECTIONS))
    crawl = build_section(CrawlConfig, "crawl", data.get("crawl") or {})
    sections = {name: build_section(cls, name, data.get(name) or {},
                                    **({"crawl": crawl} if name == "collect" else {}))
                for name, cls in SECTIONS.items() if name != "crawl"}
    return PipelineConfig(**sections)


# ---------------------------------------------------------------- per-record work in workers
@dataclass(frozen=True)
class FirstPass:
    """Worker side of pass one: clean and judge each record, then sign the survivors for
    dedup and hash their lines for the boilerplate counter."""

    clean: CleanStep | None
    quality: QualityStep | None
    dedup: DedupConfig | None
    boilerplate: BoilerplateLines | None

    def __call__(self, records: list[Record]) -> list[tuple[Record | Drop, Any, Any]]:
        steps = [s for s in (self.clean, self.quality) if s is not None]
        done = [_run(record, steps) for record in records]
        kept = [r.text for r in done if isinstance(r, Record)]
        signs = iter(signatures(kept, self.dedup) if self.dedup is not None else [])
        return [(r, next(signs, None), self.boilerplate.line_hashes(r.text)
                 if self.boilerplate is not None else None)
                if isinstance(r, Record) else (r, None, None) for r in done]


@dataclass(frozen=True)
class SecondPass:
    """Worker side of pass two: drop boilerplate lines (counted over kept documents), mask PII.
    Each result is (record or drop, PII counts, boilerplate lines removed): the counts come
    from the stages themselves, never from meta, which may hold an input's own "pii" field."""

    boilerplate: BoilerplateLines | None
    pii: Callable[[Record], Record] | None

    def __call__(self, records: list[Record]) -> list[tuple[Record | Drop, dict[str, int], int]]:
        return [self._one(r) for r in records]

    def _one(self, record: Record) -> tuple[Record | Drop, dict[str, int], int]:
        removed = 0
        if self.boilerplate is not None:
            text, removed = self.boilerplate.remove(record.text)
            if not text:
                return Drop("boilerplate", "only boilerplate lines"), {}, 0
            record = (record.evolve("boilerplate", text=text, boilerplate_lines=removed)
                      if removed else record.evolve("boilerplate"))
        if self.pii is None:
            return record, {}, removed
        masked = self.pii(record)
        # the step sets meta["pii"] only when it masked something, and then the text changed
        return masked, masked.meta["pii"] if masked.text != record.text else {}, removed


def _run(record: Record, steps: list[Callable[[Record], Record | Drop]]) -> Record | Drop:
    for step in steps:
        record = step(record)
        if isinstance(record, Drop):
            break
    return record


# ------------------------------------------------------------------------- parallel plumbing
_work: Callable | None = None  # the pass's worker object, set once per worker process


def _init_worker(work: Callable) -> None:
    global _work
    _work = work


def _call(batch: list) -> list:
    return _work(batch)


def batches(records: Iterable[Record]) -> Iterator[list[Record]]:
    """Records grouped into lists of about BATCH_CHARS characters: one worker task each."""
    batch, size = [], 0
    for record in records:
        batch.append(record)
        size += len(record.text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def ordered_map(work: Callable[[list], list], records: Iterable[Record],
                workers: int) -> Iterator[Any]:
    """`work` over batches of records in `workers` processes, results in input order, at most
    2 × workers batches in flight (memory stays bounded whatever the corpus size)."""
    if workers <= 1:
        for batch in batches(records):
            yield from work(batch)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process holding threads
    with context.Pool(workers, initializer=_init_worker, initargs=(work,)) as pool:
        pending: deque = deque()
        for batch in batches(records):
            pending.append(pool.apply_async(_call, (batch,)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# ------------------------------------------------------------------------------- the ledger
@dataclass
class Ledger:
    """Counts for the manifest: records in, kept and dropped (by reason) at every stage."""

    dropped: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in STAGES})
    records_in: int = 0
    bytes_in: int = 0
    pii: Counter = field(default_factory=Counter)
    boilerplate_lines: int = 0
    repeated: int = 0  # extra copies written by balance

    def drop(self, drop: Drop) -> None:
        self.dropped[drop.stage][drop.reason] += 1

    def stages(self, switches: StageSwitches, skipped: CollectReport) -> list[dict[str, Any]]:
        """One row per stage that ran: in, kept, dropped by reason."""
        self.dropped["collect"] = skipped.reasons
        rows, count = [], self.records_in + sum(skipped.reasons.values())
        for stage in STAGES:
            if stage not in ("collect", "balance") and not getattr(switches, stage):
                continue
            dropped = dict(sorted(self.dropped[stage].items()))
            kept = count - sum(dropped.values()) + (self.repeated if stage == "balance" else 0)
            rows.append({"stage": stage, "in": count, "kept": kept, "dropped": dropped})
            count = kept
        return rows


# ------------------------------------------------------------------------------- the runner
Mapper = Callable[[Callable[[list], list], Iterable[Record], int], Iterator[Any]]


def prepare(inputs: list[str | Path], out_dir: str | Path,
            config: PipelineConfig | None = None, *, progress: bool = False,
            mapper: Mapper = ordered_map) -> dict[str, Any]:
    """Run the pipeline over `inputs` (files, folders, URLs) into `out_dir`; return the
    manifest (also written as out_dir/manifest.json and a readable manifest.md). `mapper`
    runs the per-record work in order: local processes by default, or a cluster's."""
    config = config or PipelineConfig()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; choose another --out")
    _check_apart(inputs, out)
    workers = config.output.workers or os.cpu_count() or 1
    report = CollectReport()
    records = collect(inputs, config.collect, report)  # raises at once on a missing input
    tokenizer = _tokenizer(config.output)  # a bad name fails now, not after every stage ran
    work = _work_dir(out)
    started = time.perf_counter()
    try:
        ledger = Ledger()
        with _bar(progress, "pass 1: clean, quality, dedup") as bar:
            boilerplate = _first_pass(_counted(records, ledger, bar), config, workers, ledger,
                                      work / "spool.jsonl", mapper)
        with _bar(progress, "pass 2: boilerplate, PII, balance") as bar:
            data = _second_pass(work / "spool.jsonl", boilerplate, config, workers, ledger,
                                work / "data.jsonl", bar, mapper)
        (work / "spool.jsonl").unlink()
        manifest = _manifest(inputs, config, ledger, report, data)
        if tokenizer is not None:
            manifest["shards"] = _shards(work, tokenizer, config.output, workers)
        atomic_write(work / "manifest.json",
                     json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
        atomic_write(work / "manifest.md", manifest_table(manifest))
        _swap_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    manifest["elapsed_s"] = round(time.perf_counter() - started, 3)
    return manifest


def _counted(records: Iterable[Record], ledger: Ledger, bar) -> Iterator[Record]:
    for record in records:
        ledger.records_in += 1
        size = len(record.text.encode("utf-8"))
        ledger.bytes_in += size
        bar.update(size)
        yield record


def _first_pass(records: Iterable[Record], config: PipelineConfig, workers: int,
                ledger: Ledger, spool: Path, mapper: Mapper) -> BoilerplateLines | None:
    on = config.stages
    boilerplate = BoilerplateLines(config.clean) if on.boilerplate else None
    dedup = Deduplicator(config.dedup) if on.dedup else None
    work = FirstPass(CleanStep(config.clean) if on.clean else None,
                     QualityStep(config.quality) if on.quality else None,
                     config.dedup if on.dedup else None, boilerplate)
    with open(spool, "w", encoding="utf-8") as f:
        for result, sign, lines in mapper(work, records, workers):
            if not isinstance(result, Drop) and dedup is not None:
                result = dedup.check(result, sign)
            if isinstance(result, Drop):
                ledger.drop(result)
                continue
            if boilerplate is not None:
                boilerplate.add(lines)
            f.write(_dumps({"text": result.text, "source": result.source,
                            "meta": result.meta, "steps": result.steps}))
    if boilerplate is not None:
        boilerplate.finalize()
    return boilerplate


def _spooled(spool: Path) -> Iterator[Record]:
    with open(spool, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield Record(row["text"], row["source"], row["meta"], tuple(row["steps"]))


def _second_pass(spool: Path, boilerplate: BoilerplateLines | None, config: PipelineConfig,
                 workers: int, ledger: Ledger, data: Path, bar, mapper: Mapper
                 ) -> dict[str, Any]:
    work = SecondPass(boilerplate, pii_step(config.pii) if config.stages.pii else None)
    digest, written, size = hashlib.sha256(), 0, 0
    with open(data, "wb") as f:
        for result, pii, removed in mapper(work, _spooled(spool), workers):
            if isinstance(result, Drop):
                ledger.drop(result)
                continue
            ledger.pii.update(pii)
            ledger.boilerplate_lines += removed
            for copy in balanced(result, config.balance, ledger):
                line = _dumps(copy.to_json()).encode("utf-8")
                f.write(line)
                digest.update(line)
                written += 1
                size += len(line)
                bar.update(len(line))
        f.flush()
        os.fsync(f.fileno())
    return {"file": "data.jsonl", "records": written, "bytes": size,
            "sha256": digest.hexdigest()}


def balanced(record: Record, config: BalanceConfig, ledger: Ledger) -> list[Record]:
    """The copies of `record` its source's weight asks for (none, one, or more)."""
    weight = next((w for pattern, w in config.weights.items()
                   if fnmatchcase(record.source, pattern)), 1.0)
    if weight == 1.0:
        return [record]
    whole, part = divmod(weight, 1.0)
    draw = int.from_bytes(hashlib.sha256(f"{config.seed}:{record.content_hash}".encode())
                          .digest()[:8], "little") / 2**64
    copies = int(whole) + (draw < part)
    if copies == 0:
        ledger.drop(Drop("balance", f"down-sampled (weight {weight:g})"))
        return []
    ledger.repeated += copies - 1
    return [record.evolve("balance", balance_copy=i + 1, balance_weight=weight)
            for i in range(copies)]


# --------------------------------------------------------------------------------- outputs
def _manifest(inputs: list, config: PipelineConfig, ledger: Ledger, report: CollectReport,
              data: dict[str, Any]) -> dict[str, Any]:
    return {"inputs": [str(i) for i in inputs],
            "stages": ledger.stages(config.stages, report),
            "input_records": ledger.records_in, "input_bytes": ledger.bytes_in,
            "pii_masked": dict(sorted(ledger.pii.items())),
            "boilerplate_lines_removed": ledger.boilerplate_lines,
            "skipped_inputs": [list(s) for s in report.skipped[:50]],
            "output": data, "config": _plain(asdict(config))}


def manifest_table(manifest: dict[str, Any]) -> str:
    """The manifest as a Markdown table a person reads: what each stage kept and dropped."""
    lines = ["| stage | in | kept | dropped (reason: count) |", "|---|---:|---:|---|"]
    for row in manifest["stages"]:
        why = ", ".join(f"{reason}: {n:,}" for reason, n in row["dropped"].items()) or "–"
        lines.append(f"| {row['stage']} | {row['in']:,} | {row['kept']:,} | {why} |")
    out = manifest["output"]
    lines += ["", f"Output: {out['records']:,} records, {out['bytes']:,} bytes in "
                  f"{out['file']} (sha256 {out['sha256'][:16]}…).",
              f"PII masked: {_counts(manifest['pii_masked'])}; boilerplate lines removed: "
              f"{manifest['boilerplate_lines_removed']:,}."]
    if "shards" in manifest:
        splits = manifest["shards"]["splits"]
        lines.append("Token shards: " + ", ".join(f"{name} {s['tokens']:,} tokens"
                                                  for name, s in splits.items()) + ".")
    return "\n".join(lines) + "\n"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items()) or "none"


def _tokenizer(output: OutputConfig) -> Tokenizer | None:
    """The tokenizer `output` names (loaded, pulled if need be), or None for no shards."""
    if not output.tokenizer:
        return None
    from pagoda.data.tokenize import load_tokenizer

    return load_tokenizer(output.tokenizer)


def _shards(work: Path, tokenizer: Tokenizer, output: OutputConfig,
            workers: int) -> dict[str, Any]:
    from pagoda.data.tokenize import tokenize_corpus

    return tokenize_corpus([work / "data.jsonl"], tokenizer, work / "shards",
                           val_fraction=output.val_fraction, workers=workers)


def _plain(value: Any) -> Any:
    """Config values as JSON: sets sorted into lists, tuples as lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _dumps(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=_plain) + "\n"


def _check_apart(inputs: list[str | Path], out: Path) -> None:
    """Refuse an `out` that is, holds or lies inside an input folder: replacing it whole would
    delete the inputs, and output inside an input would be read back as input next time."""
    target = out.resolve()
    for item in inputs:
        if isinstance(item, str) and item.lower().startswith(("http://", "https://")):
            continue
        source = Path(item).resolve()
        if source == target or target in source.parents or source in target.parents:
            raise ConfigError(f"--out {out} overlaps the input {item}: the output folder is "
                              "replaced whole, so it must lie outside every input")


def _work_dir(out: Path) -> Path:
    """A fresh temporary folder beside `out` (same file system, so the final rename is
    atomic); leftovers of killed runs are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = sorted(out.parent.glob(f".{out.name}.tmp-old-*"))
    if previous and not out.exists():  # killed between the two renames of the swap
        os.replace(previous[-1], out)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        if not _running(stale.name.rpartition("-")[2]):  # not another run's work in progress
            shutil.rmtree(stale, ignore_errors=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    work.mkdir()
    return work


def _running(pid: str) -> bool:
    """Whether process `pid` (from a work folder's name) is alive, other than this one."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _swap_into_place(work: Path, out: Path) -> None:
    """Replace `out` by `work`: the old output stays whole until the new one is complete."""
    old = out.parent / f".{out.name}.tmp-old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)
    fsync_path(out.parent)


def _bar(enabled: bool, description: str):
    """A tqdm bar in bytes of text (a no-op when disabled)."""
    from tqdm import tqdm

    return tqdm(total=None, unit="B", unit_scale=True, desc=description, disable=not enabled,
                dynamic_ncols=True)
