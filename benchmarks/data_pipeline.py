"""Throughput and peak memory of `pagoda data prepare` on tiny Shakespeare replicated with
perturbations to 100 MB.

The corpus: the text cut into ~4 KB documents (paragraph boundaries), then copied until the
target size, each copy perturbed the way crawled text is: words dropped or doubled, lines
swapped, a site footer and a cookie banner added to some pages, an e-mail address or phone
number in some, a few pages in HTML. Most copies are near-duplicates of an earlier one, as in a
real crawl, so the dedup stage does real work; every stage runs with its defaults.

    python benchmarks/data_pipeline.py [--mb 100] [--workers 2]

Targets: ≥ 5 MB/s on 2 cores, peak RSS under 1 GB (the main process plus its largest worker,
both measured by the kernel). Writes benchmarks/results/data_pipeline.json and .png (records
kept and dropped by stage); the last stdout line is one JSON object with mb_s and peak_rss_mb.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, pyplot, save_png, write_json  # noqa: E402

from pagoda.data.pipeline import load_pipeline_config, prepare  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TARGET_MB_S, TARGET_RSS_MB = 5.0, 1000
FOOTER = "Copyright 2024 The Globe Theatre Archive. All rights reserved. Terms of use."
BANNER = "We use cookies to improve your experience on our website. Accept all cookies?"


def documents(text: str, size: int = 4000) -> list[str]:
    """The text cut at paragraph breaks into documents of about `size` characters."""
    docs, current = [], []
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        if sum(len(p) for p in current) >= size:
            docs.append("\n\n".join(current))
            current = []
    return docs + (["\n\n".join(current)] if current else [])


def perturb(doc: str, rng: random.Random) -> str:
    """One crawled copy of `doc`: a few word and line edits, sometimes boilerplate or PII."""
    lines = doc.split("\n")
    for _ in range(rng.randint(1, 6)):
        i = rng.randrange(len(lines))
        words = lines[i].split()
        if words:
            j = rng.randrange(len(words))
            words[j:j + 1] = rng.choice([[], [words[j], words[j]], [words[j].upper()]])
            lines[i] = " ".join(words)
    if len(lines) > 3 and rng.random() < 0.5:
        i = rng.randrange(len(lines) - 1)
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
    if rng.random() < 0.3:
        lines.append(f"Contact the editor at editor{rng.randrange(1000)}@globe-archive.org "
                     f"or +44 20 7946 {rng.randrange(1000, 9999)}.")
    if rng.random() < 0.5:
        lines = [BANNER, *lines, FOOTER]
    text = "\n".join(lines)
    if rng.random() < 0.1:
        body = "".join(f"<p>{p}</p>" for p in text.split("\n\n"))
        text = f"<html><head><title>Archive</title></head><body>{body}</body></html>"
    return text


def write_corpus(folder: Path, megabytes: float, seed: int = 0) -> int:
    """JSONL shards of perturbed copies until `megabytes`; returns the bytes of text written."""
    rng = random.Random(seed)
    docs = documents(TEXT.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    written, shard, target = 0, 0, int(megabytes * 1e6)
    while written < target:
        with open(folder / f"crawl-{shard:03d}.jsonl", "w", encoding="utf-8") as f:
            for doc in docs:
                text = perturb(doc, rng)
                f.write(json.dumps({"text": text, "url": f"https://archive.example/{shard}/"
                                    f"{rng.randrange(10**6)}"}, ensure_ascii=False) + "\n")
                written += len(text.encode("utf-8"))
        shard += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size in MB (100)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        size = write_corpus(work / "corpus", args.mb)
        config = load_pipeline_config(overrides=[f"output.workers={args.workers}"])
        started = time.perf_counter()
        manifest = prepare([work / "corpus"], work / "out", config, progress=True)
        wall = time.perf_counter() - started
    main_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {"input_mb": round(size / 1e6, 1), "wall_s": round(wall, 1),
              "mb_s": round(size / 1e6 / wall, 2), "workers": args.workers,
              "main_rss_mb": round(main_rss), "largest_worker_rss_mb": round(worker_rss),
              "peak_rss_mb": round(main_rss + worker_rss),
              "target_mb_s": TARGET_MB_S, "target_rss_mb": TARGET_RSS_MB,
              "stages": manifest["stages"], "pii_masked": manifest["pii_masked"],
              "boilerplate_lines_removed": manifest["boilerplate_lines_removed"],
              "output": manifest["output"], "machine": machine_info(args.workers)}
    result["reached_target"] = (result["mb_s"] >= TARGET_MB_S
                                and result["peak_rss_mb"] < TARGET_RSS_MB)
    write_json(result, args.results / "data_pipeline.json")
    plot(result, args.results / "data_pipeline.png")
    for row in result["stages"]:
        print(f"{row['stage']:>12}: {row['in']:>8,} in {row['kept']:>8,} kept  {row['dropped']}")
    print(f"{result['input_mb']} MB in {wall:.1f} s: {result['mb_s']} MB/s with "
          f"{args.workers} workers; peak RSS {result['peak_rss_mb']} MB (main "
          f"{result['main_rss_mb']}, largest worker {result['largest_worker_rss_mb']})")
    print(json.dumps({k: result[k] for k in ("mb_s", "peak_rss_mb", "wall_s", "input_mb")}))


def plot(result: dict, path: Path) -> None:
    plt = pyplot(path.name)
    if plt is None:
        return
    rows = result["stages"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar([r["stage"] for r in rows], [r["kept"] for r in rows], label="kept")
    ax.bar([r["stage"] for r in rows], [r["in"] - r["kept"] for r in rows],
           bottom=[r["kept"] for r in rows], label="dropped")
    ax.set_ylabel("records")
    ax.set_title(f"pagoda data prepare: {result['input_mb']} MB at {result['mb_s']} MB/s, "
                 f"peak RSS {result['peak_rss_mb']} MB")
    ax.legend()
    save_png(fig, path)


if __name__ == "__main__":
    main()
