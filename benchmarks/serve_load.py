"""Serving under load: N concurrent streaming chat clients against Pagoda's server, a
static-batching baseline and llama.cpp's server, in the same run, on loopback.

Peers (each a separate server process on 127.0.0.1, all started by this script, measured one
at a time, interleaved level by level in a rotating order, and always stopped at the end):

    pagoda     `pagoda serve --model smollm2-135m-instruct` — the engine's continuous batching
               (new requests join the running batch between decode steps).
    static     the same FastAPI app and routes (`pagoda.serve.create_app`) with the engine
               swapped for `StaticBatchEngine` below: requests are grouped into batches of up
               to --max-running that start only when the previous batch has completely
               finished; a batch runs `pagoda.infer.generate.generate_tokens` over its prompts
               (left-padded, finished rows ride along) until every row is done. A batch starts
               when it is full or --static-window-ms after its first request arrived. The
               engine has no switch to turn continuous batching off, so the baseline lives here.
    llamacpp   llama-cpp-python's server (`python -m llama_cpp.server`) on the same GGUF, from
               the separate venv .venv-bench (see benchmarks/README.md); skipped with a note
               when that interpreter is missing.

Workload (identical for every peer): closed loop — at concurrency N, N clients each send a
streaming /v1/chat/completions request, wait for its end, send the next; request i of a run
gets that run's prompt i and max_tokens i, and no prompt is sent in two runs (levels or
repeats), so prefix caches see only what the requests really share. Prompts are real
passages of tinyshakespeare (../shared/data/tinyshakespeare/input.txt) with a fixed system
message and a request to continue the scene; temperature 0; EOS is honoured (outputs may end
early; all peers see the same requests). Measured on the client: output tokens = streamed
chunks with non-empty content (the same rule for every peer; the server's usage figure is kept
as a cross-check), aggregate tokens/s = output tokens / (last response end - first request
start), TTFT = request sent -> first content chunk, inter-token latency = gap between
consecutive content chunks.

    .venv/bin/python benchmarks/serve_load.py            # levels 1,4,16,64
    .venv/bin/python benchmarks/serve_load.py --quick    # smoke test: levels 1,4, few requests

Writes benchmarks/results/serve_load.json and serve_load.png; the last stdout line is one JSON
object. Targets are reported, not asserted (exit code 0 unless something errors).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import machine_info, pyplot, save_png, write_json

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/data/tinyshakespeare/input.txt"
RESULTS = REPO / "benchmarks" / "results"
MODEL = "smollm2-135m-instruct"
PEERS = ("pagoda", "static", "llamacpp")
TARGET_LEVEL = 16
TARGETS = {  # all evaluated at TARGET_LEVEL concurrent streams
    "scaling": 3.0,        # pagoda tok/s at 16 streams / pagoda tok/s at 1 stream, at least
    "vs_llamacpp": 1.0,    # pagoda / llama.cpp tok/s at 16 streams, at least
    "vs_static": 1.5,      # pagoda / static batching tok/s at 16 streams, at least
    "ttft_p99_vs_prefill": 1.5,  # TTFT p99 at 16 streams / back-to-back prefill of 16, at most
}
SYSTEM = "You are a helpful assistant."
ASK = "Continue this scene from a play in the same style, with several more speeches:\n\n"
HOST = "127.0.0.1"  # loopback only, for every peer
LENGTH_CYCLE = 16  # distinct max_tokens values, repeating (every 16 requests cover the spread)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --quick fills in small values for anything not given."""
    p = argparse.ArgumentParser(
        description="Aggregate tokens/s, TTFT and inter-token latency of N concurrent streaming "
        "chat clients: Pagoda (continuous batching) vs static batching vs llama.cpp's server.",
        epilog="example: .venv/bin/python benchmarks/serve_load.py --levels 1,4,16,64 "
        "--max-tokens 16-128",
    )
    p.add_argument("--levels", default=None,
                   help="comma-separated concurrency levels (default 1,4,16,64; --quick: 1,4)")
    p.add_argument("--rounds", type=int, default=None, help="requests per client at each level "
                   "(default 3; --quick: 1); at least --min-requests requests per level")
    p.add_argument("--min-requests", type=int, default=None,
                   help="requests per level at least (default 8; --quick: 4)")
    p.add_argument("--max-tokens", default=None,
                   help="max_tokens per request: N, or MIN-MAX for a fixed deterministic "
                   "spread (default 16-128, mean 72; --quick: 16-48)")
    p.add_argument("--peers", default=",".join(PEERS),
                   help=f"comma-separated subset of {','.join(PEERS)} (default all)")
    p.add_argument("--max-running", type=int, default=16,
                   help="pagoda's --max-running, static batch size and llama.cpp's parallel "
                   "slots (default 16)")
    p.add_argument("--static-window-ms", type=float, default=50.0,
                   help="static batching: start a batch this long after its first request "
                   "if it is not full by then (default 50)")
    p.add_argument("--threads", type=int, default=2,
                   help="compute threads of every server (torch / llama.cpp; default 2)")
    p.add_argument("--llama-python", type=Path, default=None,
                   help="python with llama-cpp-python[server] (default .venv-bench/bin/python)")
    p.add_argument("--level-timeout", type=float, default=900.0,
                   help="seconds one level may take before it is cut off (default 900)")
    p.add_argument("--startup-timeout", type=float, default=300.0,
                   help="seconds a server may take to become ready (default 300)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of every level and peer, interleaved; the fastest is reported "
                   "(default 1; 2-3 on a busy machine)")
    p.add_argument("--quick", action="store_true", help="smoke test: levels 1,4, few requests")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="folder for serve_load.json/serve_load.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    p.add_argument("--serve-static", type=int, default=None, metavar="PORT",
                   help=argparse.SUPPRESS)  # internal: run the static-batching server
    args = p.parse_args(argv)
    quick = args.quick
    args.levels = args.levels or ("1,4" if quick else "1,4,16,64")
    args.rounds = args.rounds or (1 if quick else 3)
    args.min_requests = args.min_requests or (4 if quick else 8)
    args.max_tokens = args.max_tokens or ("16-48" if quick else "16-128")
    try:
        args.levels = sorted({int(x) for x in str(args.levels).split(",") if x.strip()})
        lo, _, hi = str(args.max_tokens).partition("-")
        args.max_tokens_range = (int(lo), int(hi or lo))
    except ValueError:
        p.error("--levels must be comma-separated integers and --max-tokens N or MIN-MAX")
    if not args.levels or min(args.levels) < 1:
        p.error("--levels needs at least one level >= 1")
    if not 1 <= args.max_tokens_range[0] <= args.max_tokens_range[1]:
        p.error("--max-tokens must be N >= 1 or MIN-MAX with 1 <= MIN <= MAX")
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    if not args.peers or set(args.peers) - set(PEERS):
        p.error(f"--peers must be a comma-separated subset of {','.join(PEERS)}")
    if min(args.rounds, args.min_requests, args.max_running, args.threads, args.repeats) < 1:
        p.error("--rounds, --min-requests, --max-running, --threads, --repeats must be >= 1")
    if args.llama_python is None:
        args.llama_python = REPO / ".venv-bench" / "bin" / "python"
    return args


# ------------------------------------------------------------------------------ workload
@dataclass
class Request:
    """One chat request of the workload."""

    messages: list[dict[str, str]]
    max_tokens: int


def build_workload(count: int, tokens: tuple[int, int], seed: int = 0) -> list[Request]:
    """`count` requests: passages of 200-900 characters of tinyshakespeare starting at a speech
    (prompts of about 100-380 tokens with the chat template, mean about 250), and max_tokens
    cycling through 16 values spread evenly over `tokens` in a fixed shuffled order. Request i
    is the same whatever `count` is."""
    rng = random.Random(seed)
    speeches = [s.strip() for s in DATA.read_text(encoding="utf-8").split("\n\n") if s.strip()]
    lo, hi = tokens
    cycle = [lo + round((hi - lo) * j / (LENGTH_CYCLE - 1)) for j in range(LENGTH_CYCLE)]
    random.Random(seed + 1).shuffle(cycle)
    out = []
    for i in range(count):
        want = rng.randint(200, 900)
        start = rng.randrange(len(speeches) - 200)
        passage: list[str] = []
        while sum(len(s) + 2 for s in passage) < want:
            passage.append(speeches[start + len(passage)])
        text = "\n\n".join(passage)[:1000]
        out.append(Request([{"role": "system", "content": SYSTEM},
                            {"role": "user", "content": ASK + text}],
                           cycle[i % LENGTH_CYCLE]))
    return out


def requests_for(level: int, args: argparse.Namespace) -> int:
    return max(args.rounds * level, args.min_requests)


def run_offsets(runs: list[tuple[int, int]], counts: dict[int, int]) -> dict[tuple[int, int], int]:
    """Where each (level, repeat) run's requests start in the workload. Every run gets prompts
    no earlier run sent, so a server's prefix cache only ever reuses what requests really share
    (the system message and chat template), and each starts on a whole cycle of max_tokens
    values, so every run draws the same mix. The first cycle is the warm-up's."""
    offsets, at = {}, LENGTH_CYCLE
    for level, rep in runs:
        offsets[level, rep] = at
        at += -(-counts[level] // LENGTH_CYCLE) * LENGTH_CYCLE
    return offsets


# ------------------------------------------------------------------------------ static batching
class StaticBatchEngine:
    """Static batching behind the AsyncEngine interface (`generate`, `stats`, `shutdown`), so
    the server's HTTP layer is unchanged: a worker thread takes up to `batch_size` waiting
    requests (waiting at most `window_s` for the batch to fill), runs `generate_tokens` over
    them until every one has finished, and only then forms the next batch."""

    def __init__(self, model: Any, eos_ids: frozenset[int], batch_size: int,
                 window_s: float) -> None:
        from pagoda.infer.kernels import use_native_kernels

        self.model = use_native_kernels(model.eval())
        self.eos_ids = frozenset(eos_ids)
        self.batch_size, self.window_s = batch_size, window_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self._running = 0
        self._stopping = False
        self.batches: list[int] = []  # size of every batch run (for the log)
        self._thread = threading.Thread(target=self._run, name="static-batcher", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> Any:
        from pagoda.infer.engine import EngineStats

        return EngineStats(self._running, self._inbox.qsize(), 0, 0, 16)

    async def generate(self, prompt_ids: list[int], params: Any, request_id: str | None = None,
                       adapter: str | None = None) -> Any:
        """Tokens (`TokenOutput`) of one request; closing the iterator cancels it."""
        from pagoda.infer.generate import check_request

        if adapter is not None:
            raise ValueError("the static-batching baseline serves the base model only")
        request_id = request_id or uuid.uuid4().hex
        check_request(len(prompt_ids), params, self.model.cfg.max_seq_len)
        loop, stream = asyncio.get_running_loop(), asyncio.Queue()
        self._inbox.put((request_id, list(prompt_ids), params, loop, stream))
        finished = False
        try:
            while not finished:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finish_reason is not None
                yield out
        finally:
            if not finished:
                with self._lock:
                    self._aborted.add(request_id)

    def shutdown(self) -> None:
        self._stopping = True
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from pagoda.infer.engine import TokenOutput
        from pagoda.infer.generate import generate_tokens

        while not self._stopping:
            try:
                batch = [self._inbox.get(timeout=0.2)]
            except queue.Empty:
                continue
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.batch_size and (left := deadline - time.monotonic()) > 0:
                try:
                    batch.append(self._inbox.get(timeout=left))
                except queue.Empty:
                    break
            with self._lock:
                batch = [r for r in batch if r[0] not in self._aborted]
            if not batch:
                continue
            self._running = len(batch)
            self.batches.append(len(batch))
            cancelled: set[int] = set()
            done: set[int] = set()
            try:
                for events in generate_tokens(self.model, [r[1] for r in batch],
                                              [r[2] for r in batch], eos_ids=self.eos_ids,
                                              cancelled=cancelled):
                    for e in events:
                        rid, prompt, _, loop, stream = batch[e.index]
                        out = TokenOutput(rid, e.token_id, e.logprob, e.top_logprobs,
                                          e.finish_reason, len(prompt))
                        loop.call_soon_threadsafe(stream.put_nowait, out)
                        if e.finish_reason:
                            done.add(e.index)
                    with self._lock:
                        cancelled.update(i for i, r in enumerate(batch) if r[0] in self._aborted)
            except Exception as exc:  # fail the batch, keep serving
                for i, (_, _, _, loop, stream) in enumerate(batch):
                    if i not in done:
                        loop.call_soon_threadsafe(stream.put_nowait, exc)
            with self._lock:
                self._aborted -= {r[0] for r in batch}
            self._running = 0


def serve_static(args: argparse.Namespace) -> int:
    """Internal mode: the Pagoda API app over StaticBatchEngine on 127.0.0.1:PORT."""
    import uvicorn

    from pagoda.hub.loader import load_model
    from pagoda.serve import ServeSettings, create_app

    loaded = load_model(MODEL)
    engine = StaticBatchEngine(loaded.model, loaded.tokenizer.eos_ids, args.max_running,
                               args.static_window_ms / 1000)
    app = create_app(loaded, ServeSettings(host=HOST, port=args.serve_static), engine=engine)

    @app.get("/v1/static_batches")  # for the report: how many batches, how full
    async def static_batches() -> dict[str, Any]:
        sizes = list(engine.batches)
        return {"batches": len(sizes), "sizes": sizes}

    try:
        uvicorn.run(app, host=HOST, port=args.serve_static, access_log=False,
                    log_level="warning")
    finally:
        engine.shutdown()
    return 0


# ------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A peer's server process: started in its own process group, always stopped."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.base = f"http://{HOST}:{port}"

    def start(self, timeout: float) -> None:
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with code {self.proc.returncode} "
                                   f"before it was ready; see {self.log_path}:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/v1/models", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} server not ready after {timeout:.0f} s; "
                           f"see {self.log_path}:\n{self.tail()}")

    def model_id(self) -> str:
        import httpx

        return httpx.get(self.base + "/v1/models", timeout=10).json()["data"][0]["id"]

    def static_batches(self) -> list[int]:
        """Sizes of the batches the static-batching server has run so far."""
        import httpx

        return httpx.get(self.base + "/v1/static_batches", timeout=10).json()["sizes"]

    def tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()


def llama_parallel_flag(python: Path) -> tuple[str | None, str]:
    """The llama_cpp.server flag for parallel sequences, if any, and the package version."""
    help_text = subprocess.run([str(python), "-m", "llama_cpp.server", "--help"],
                               capture_output=True, text=True, timeout=120).stdout
    version = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    for flag in ("--n_parallel", "--parallel", "--n_seq_max"):
        if flag + " " in help_text or flag + "\n" in help_text:
            return flag, version
    return None, version


def make_server(peer: str, args: argparse.Namespace, gguf: Path, notes: list[str]) -> Server:
    """The server command of one peer."""
    port = free_port()
    log = args.log_dir / f"{peer}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if peer == "pagoda":
        cmd = [sys.executable, "-m", "pagoda.cli", "serve", "--model", MODEL, "--host", HOST,
               "--port", str(port), "--max-running", str(args.max_running), "--device", "cpu"]
        return Server(peer, cmd, port, log, env)
    if peer == "static":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-static", str(port),
               "--max-running", str(args.max_running),
               "--static-window-ms", str(args.static_window_ms)]
        return Server(peer, cmd, port, log, env)
    flag, version = llama_parallel_flag(args.llama_python)
    cmd = [str(args.llama_python), "-m", "llama_cpp.server", "--model", str(gguf),
           "--host", HOST, "--port", str(port), "--n_ctx", "8192",
           "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
           "--interrupt_requests", "False"]  # queue concurrent requests, do not cancel them
    if flag:
        cmd += [flag, str(args.max_running)]
    else:
        notes.append(f"llama-cpp-python {version}: its server has no parallel-slot option "
                     f"(no --n_parallel in --help), so it serves one request at a time; "
                     "measured as is")
    return Server(peer, cmd, port, log, {**env, "LLAMA_CPP_VERSION": version})


# ------------------------------------------------------------------------------ clients
@dataclass
class Record:
    """What one client saw of one request."""

    index: int
    start: float = 0.0
    end: float = 0.0
    chunks: list[float] = field(default_factory=list)  # arrival of every content chunk
    usage_tokens: int | None = None
    usage_prompt: int | None = None
    finish: str | None = None
    error: str | None = None


async def one_request(client: Any, url: str, model: str, req: Request, rec: Record) -> None:
    """Send one streaming chat request and record chunk arrival times."""
    body = {"model": model, "messages": req.messages, "stream": True, "temperature": 0,
            "max_tokens": req.max_tokens, "stream_options": {"include_usage": True}}
    rec.start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if "error" in obj:
                    rec.error = str(obj["error"])[:200]
                    break
                if obj.get("usage"):
                    rec.usage_tokens = obj["usage"].get("completion_tokens")
                    rec.usage_prompt = obj["usage"].get("prompt_tokens")
                for choice in obj.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        rec.chunks.append(now)
                    if choice.get("finish_reason"):
                        rec.finish = choice["finish_reason"]
    except Exception as exc:  # noqa: BLE001 (recorded, reported as an error)
        rec.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        rec.end = time.perf_counter()


async def run_level(base: str, model: str, workload: list[Request], level: int, count: int,
                    timeout: float) -> tuple[list[Record], bool]:
    """Closed loop: `level` clients share `count` requests in order; (records, timed_out)."""
    import httpx

    records = [Record(i) for i in range(count)]
    next_index = iter(range(count))
    limits = httpx.Limits(max_connections=level + 4, max_keepalive_connections=level + 4)
    tmo = httpx.Timeout(connect=30, read=timeout, write=30, pool=timeout)
    async with httpx.AsyncClient(limits=limits, timeout=tmo, trust_env=False) as client:
        url = base + "/v1/chat/completions"

        async def worker() -> None:
            for i in next_index:
                await one_request(client, url, model, workload[i % len(workload)], records[i])

        tasks = [asyncio.create_task(worker()) for _ in range(level)]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return [r for r in records if r.start], bool(pending)


def pct(values: list[float], q: float) -> float | None:
    """q-th percentile (0-100), linear interpolation; None without values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize_level(level: int, records: list[Record], timed_out: bool) -> dict:
    """Aggregate tokens/s, TTFT and inter-token latency of one level."""
    ok = [r for r in records if r.error is None and r.end]
    tokens = sum(len(r.chunks) for r in ok)
    wall = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
    ttft = [r.chunks[0] - r.start for r in ok if r.chunks]
    itl = [b - a for r in ok for a, b in zip(r.chunks, r.chunks[1:], strict=False)]
    usage = [r.usage_tokens for r in ok]
    prompt = [r.usage_prompt for r in ok if r.usage_prompt is not None]
    finishes: dict[str, int] = {}
    for r in ok:
        finishes[str(r.finish)] = finishes.get(str(r.finish), 0) + 1

    def r4(x: float | None, scale: float = 1.0) -> float | None:
        return None if x is None else round(x * scale, 4)

    return {
        "concurrency": level,
        "requests": len(records),
        "errors": len(records) - len(ok),
        "first_error": next((r.error for r in records if r.error), None),
        "timed_out": timed_out,
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "usage_completion_tokens": sum(usage) if usage and None not in usage else None,
        "tok_s": round(tokens / wall, 2) if wall else None,
        "req_s": round(len(ok) / wall, 3) if wall else None,
        "ttft_p50_s": r4(pct(ttft, 50)),
        "ttft_p99_s": r4(pct(ttft, 99)),
        "itl_p50_ms": r4(pct(itl, 50), 1000),
        "itl_p99_ms": r4(pct(itl, 99), 1000),
        "mean_output_tokens": round(tokens / len(ok), 1) if ok else None,
        "mean_prompt_tokens_usage": round(statistics.fmean(prompt), 1) if prompt else None,
        "finish_reasons": finishes,
    }


# ------------------------------------------------------------------------------ prefill
def measure_prefill(workload: list[Request], n: int, threads: int, repeats: int = 5) -> dict:
    """Seconds to prefill the first n prompts one after another (batch 1, in-process, the
    prompt ids the server builds), median (and min) of `repeats` after a warm-up."""
    import torch

    from pagoda.hub.loader import load_model
    from pagoda.infer.generate import generate_tokens
    from pagoda.infer.sampling import SamplingParams
    from pagoda.tokenizer import render_chat

    torch.set_num_threads(threads)
    loaded = load_model(MODEL, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    prompts = [tok.encode(render_chat(tok, r.messages), add_special_tokens=False)
               for r in workload[:n]]
    params = [SamplingParams(temperature=0, max_tokens=1)]

    def once() -> float:
        start = time.perf_counter()
        for ids in prompts:
            for _ in generate_tokens(model, [ids], params, eos_ids=tok.eos_ids):
                pass
        return time.perf_counter() - start

    once()  # warm-up
    runs = [once() for _ in range(repeats)]
    lens = [len(p) for p in prompts]
    result = {"prompts": n, "prompt_tokens": sum(lens), "mean_prompt_tokens": round(
        statistics.fmean(lens), 1), "median_s": round(statistics.median(runs), 4),
              "min_s": round(min(runs), 4),
              "runs_s": [round(t, 4) for t in runs], "gguf": str(loaded.path)}
    return result


# ------------------------------------------------------------------------------ running
def run(args: argparse.Namespace) -> dict:
    """Measure prefill, then every peer at every level; return the results object."""
    from rich.console import Console

    err = Console(stderr=True)
    load_start = os.getloadavg()[0]
    args.log_dir = Path(tempfile.mkdtemp(prefix="serve_load_"))  # server logs
    counts = {lv: requests_for(lv, args) for lv in args.levels}
    runs_order = [(lv, r) for lv in args.levels for r in range(args.repeats)]
    offsets = run_offsets(runs_order, counts)
    workload = build_workload(max(o + counts[lv] for (lv, _), o in offsets.items()),
                              args.max_tokens_range)
    notes: list[str] = []
    peers = list(args.peers)
    if "llamacpp" in peers and not args.llama_python.exists():
        notes.append(f"llama.cpp peer skipped: {args.llama_python} not found (install "
                     "llama-cpp-python[server] into .venv-bench, see benchmarks/README.md)")
        peers.remove("llamacpp")
    target_level = TARGET_LEVEL if TARGET_LEVEL in args.levels else max(
        [lv for lv in args.levels if lv <= TARGET_LEVEL] or args.levels)

    with err.status(f"prefill of {target_level} prompts back to back (in-process)"):
        prefill = measure_prefill(workload[offsets[target_level, 0]:], target_level,
                                  args.threads)
    gguf = Path(prefill.pop("gguf"))

    servers: dict[str, tuple[Server, str]] = {}  # peer -> (server, model id)
    peer_info: dict[str, dict] = {}
    runs: dict[str, dict[str, list[dict]]] = {}  # peer -> level -> rows of every repeat
    try:
        for peer in peers:  # all up at once (idle servers cost nothing), so levels interleave
            server = make_server(peer, args, gguf, notes)
            peer_info[peer] = {"cmd": " ".join(server.cmd[1:]), "log": str(server.log_path)}
            if peer == "llamacpp":
                peer_info[peer]["version"] = server.env.get("LLAMA_CPP_VERSION")
            try:
                with err.status(f"starting {peer} server on port {server.port}"):
                    server.start(args.startup_timeout)
                model = server.model_id()
                with err.status(f"{peer}: warm-up"):  # two short requests, not measured
                    asyncio.run(run_level(server.base, model, [Request(r.messages, 8)
                                                               for r in workload[:2]], 2, 2, 120))
            except Exception as exc:  # noqa: BLE001 (one peer failing must not stop the others)
                notes.append(f"{peer} skipped: {type(exc).__name__}: {exc}")
                err.print(f"[red]{peer} skipped: {exc}[/red]")
                server.stop()
                continue
            servers[peer] = (server, model)
            runs[peer] = {str(lv): [] for lv in args.levels}
        order = list(servers)
        for i, (level, rep) in enumerate(runs_order):
            k = i % len(order) if order else 0  # rotate who goes first: drift hits all peers
            for peer in order[k:] + order[:k]:
                server, model = servers[peer]
                before = server.static_batches() if peer == "static" else []
                load0 = os.getloadavg()[0]
                with err.status(f"{peer}: {level} concurrent streams, {counts[level]} requests"
                                f" (run {rep + 1}/{args.repeats})"):
                    recs, cut = asyncio.run(run_level(
                        server.base, model, workload[offsets[level, rep]:], level,
                        counts[level], args.level_timeout))
                row = summarize_level(level, recs, cut)
                row["load_avg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
                if peer == "static":  # batches this level ran, and their mean size
                    sizes = server.static_batches()[len(before):]
                    row["static_batches"] = len(sizes)
                    row["static_mean_batch"] = round(statistics.fmean(sizes), 2) if sizes else None
                runs[peer][str(level)].append(row)
                err.print(f"{peer:>9} x{level:<3} {row['tok_s']} tok/s, TTFT p50 "
                          f"{row['ttft_p50_s']} s p99 {row['ttft_p99_s']} s, ITL p50 "
                          f"{row['itl_p50_ms']} ms, errors {row['errors']}, load "
                          f"{row['load_avg_1m'][0]}->{row['load_avg_1m'][1]}")
    finally:
        for server, _ in servers.values():
            server.stop()
    # per peer and level, the repeat with the highest tokens/s (noise only slows things down)
    results = {p: {lv: {**max(rows, key=lambda r: r["tok_s"] or 0),
                        "tok_s_runs": [r["tok_s"] for r in rows]}
                   for lv, rows in levels.items() if rows}
               for p, levels in runs.items()}

    machine = machine_info(args.threads)
    machine["load_avg_1m"] = {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}
    return summarize(args, results, prefill, target_level, counts, peer_info, notes, machine,
                     gguf)


def summarize(args, results, prefill, level, counts, peer_info, notes, machine, gguf) -> dict:
    """Targets at `level` streams and the results object."""
    def tok_s(peer: str, lv: int) -> float | None:
        row = results.get(peer, {}).get(str(lv))
        return row["tok_s"] if row and not row["errors"] and not row["timed_out"] else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    p16 = tok_s("pagoda", level)
    ttft99 = results.get("pagoda", {}).get(str(level), {}).get("ttft_p99_s")
    values = {
        "scaling": ratio(p16, tok_s("pagoda", 1)),
        "vs_llamacpp": ratio(p16, tok_s("llamacpp", level)),
        "vs_static": ratio(p16, tok_s("static", level)),
        "ttft_p99_vs_prefill": ratio(ttft99, prefill["min_s"]),
    }
    targets = {}
    for k, bound in TARGETS.items():
        v = values[k]
        ok = None if v is None else (v <= bound if k == "ttft_p99_vs_prefill" else v >= bound)
        targets[k] = {("max" if k == "ttft_p99_vs_prefill" else "min"): bound, "value": v,
                      "pass": ok}
    if level != TARGET_LEVEL:
        notes.append(f"targets evaluated at {level} streams ({TARGET_LEVEL} was not measured)")
    lo, hi = args.max_tokens_range
    return {
        "benchmark": "serve_load",
        "model": MODEL,
        "gguf": gguf.name,
        "target_level": level,
        "tok_s": {p: {lv: r["tok_s"] for lv, r in rows.items()} for p, rows in results.items()},
        "ttft_p99_s": {p: {lv: r["ttft_p99_s"] for lv, r in rows.items()}
                       for p, rows in results.items()},
        "prefill_back_to_back_s": prefill["min_s"],
        "targets": targets,
        "quick": args.quick,
        "workload": {"levels": args.levels, "requests_per_level": counts,
                     "max_tokens": f"{lo}-{hi}" if lo != hi else lo, "temperature": 0,
                     "max_running": args.max_running, "static_window_ms": args.static_window_ms,
                     "prompts": "tinyshakespeare passages of 200-900 chars + system message"},
        "method": "closed-loop streaming clients on 127.0.0.1 (httpx); output tokens = content "
                  "chunks; tok/s = tokens / (last end - first start); TTFT = send -> first "
                  "content chunk; ITL = gaps between content chunks; all servers up, one "
                  "measured at a time, peers interleaved per level (rotating order); with "
                  "--repeats the fastest run of each peer and level is reported; TTFT target "
                  "against the fastest back-to-back prefill of the first N prompts",
        "repeats": args.repeats,
        "prefill": prefill,
        "by_peer": results,
        "peers": peer_info,
        "notes": notes,
        "machine": machine,
    }


# ------------------------------------------------------------------------------ output
def print_tables(result: dict) -> None:
    """Rich tables of every peer and level, then the targets."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    w = result["workload"]
    table = Table(title=f"{result['model']} — streaming chat, max_tokens {w['max_tokens']}, "
                        f"temperature 0, max_running {w['max_running']}")
    for col in ("peer", "streams", "requests", "tok/s", "TTFT p50 s", "TTFT p99 s",
                "ITL p50 ms", "ITL p99 ms", "tokens/req", "errors"):
        table.add_column(col, justify="left" if col == "peer" else "right")

    def fmt(x: Any, nd: int = 2) -> str:
        return "n/a" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)

    for peer, rows in result["by_peer"].items():
        for lv, r in rows.items():
            table.add_row(peer, lv, str(r["requests"]), fmt(r["tok_s"], 1), fmt(r["ttft_p50_s"]),
                          fmt(r["ttft_p99_s"]), fmt(r["itl_p50_ms"], 1), fmt(r["itl_p99_ms"], 1),
                          fmt(r["mean_output_tokens"], 1),
                          f"[red]{r['errors']}[/red]" if r["errors"] else "0")
    console.print(table)
    tt = Table(title=f"targets at {result['target_level']} streams "
                     f"(prefill of {result['prefill']['prompts']} prompts back to back: "
                     f"{result['prefill']['min_s']:.3f} s, fastest of "
                     f"{len(result['prefill']['runs_s'])})")
    for col in ("target", "value", "bound", "verdict"):
        tt.add_column(col, justify="left" if col == "target" else "right")
    labels = {"scaling": "pagoda tok/s vs 1 stream", "vs_llamacpp": "pagoda / llama.cpp tok/s",
              "vs_static": "continuous / static tok/s",
              "ttft_p99_vs_prefill": "TTFT p99 / back-to-back prefill"}
    for k, t in result["targets"].items():
        bound = f"<= {t['max']}x" if "max" in t else f">= {t['min']}x"
        verdict = {True: "[green]PASS[/green]", False: "[red]FAIL[/red]",
                   None: "[yellow]n/a[/yellow]"}[t["pass"]]
        tt.add_row(labels[k], "n/a" if t["value"] is None else f"{t['value']:.2f}x", bound,
                   verdict)
    console.print(tt)
    for note in result["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    m = result["machine"]
    console.print(f"[dim]{m['cpu']} · {m['cores']} cores · {m['threads']} threads per server · "
                  f"load {m['load_avg_1m']['start']} -> {m['load_avg_1m']['end']} · "
                  f"{m['date']}[/dim]")


def plot(result: dict, folder: Path) -> Path | None:
    """serve_load.png: aggregate tokens/s and TTFT (p50 solid, p99 dashed) vs concurrency."""
    plt = pyplot("serve_load.png")
    if plt is None:
        return None
    colours = {"pagoda": "#c0392b", "static": "#2980b9", "llamacpp": "#7f8c8d"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    for peer, rows in result["by_peer"].items():
        lv = [int(k) for k in rows]
        c = colours.get(peer)
        ax1.plot(lv, [rows[k]["tok_s"] or 0 for k in rows], "o-", color=c, label=peer)
        ax2.plot(lv, [rows[k]["ttft_p50_s"] or 0 for k in rows], "o-", color=c,
                 label=f"{peer} p50")
        ax2.plot(lv, [rows[k]["ttft_p99_s"] or 0 for k in rows], "s--", color=c,
                 label=f"{peer} p99", alpha=0.7)
    ax2.axhline(result["prefill"]["min_s"] * TARGETS["ttft_p99_vs_prefill"], color="black",
                lw=0.8, ls=":", label=f"TTFT target at {result['target_level']}")
    for ax, title, ylabel in ((ax1, "aggregate output tokens/s", "tokens/s"),
                              (ax2, "time to first token", "seconds")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["workload"]["levels"], [str(x) for x in result["workload"]["levels"]])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylim(bottom=0)
    ax2.set_yscale("log")
    m = result["machine"]
    fig.suptitle(f"{result['model']} ({result['gguf']}), streaming chat, max_tokens "
                 f"{result['workload']['max_tokens']} — {m['cpu']}, {m['threads']} threads, "
                 f"{m['date'][:10]}", fontsize=10)
    fig.tight_layout()
    path = save_png(fig, folder / "serve_load.png")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print tables, write JSON and PNG, end with one JSON line."""
    args = parse_args(argv)
    if args.serve_static is not None:
        return serve_static(args)
    # SIGTERM unwinds like Ctrl-C, so the `finally` that stops the servers runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not DATA.is_file():
        raise SystemExit(f"error: prompt text not found at {DATA} (expected tinyshakespeare "
                         "input.txt in the shared data folder next to the repository)")
    result = run(args)
    print_tables(result)
    json_path = write_json(result, args.out / "serve_load.json")
    png_path = None if args.no_plot else plot(result, args.out)
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""), file=sys.stderr)
    headline = {k: result[k] for k in ("benchmark", "model", "target_level", "tok_s",
                                       "ttft_p99_s", "prefill_back_to_back_s", "targets",
                                       "quick", "notes")}
    headline["machine"] = {k: result["machine"][k] for k in ("cpu", "cores", "threads", "date")}
    sys.stdout.flush()
    print(json.dumps(headline, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
