"""Live servers for the serving tests: uvicorn on a free 127.0.0.1 port in a background thread.

`smol_server` serves the real SmolLM2-135M-Instruct (session-wide); `tiny_server` serves a tiny
random Llama with SmolLM2's tokenizer (fast; for error cases); `start_server(loaded, settings)`
starts one with any settings (auth, rate limits, tiny queues) and stops it at the test's end.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


class LiveServer:
    """A running app: its base URL, an httpx client and openai clients for it."""

    def __init__(self, app, server, port: int) -> None:
        self.app = app
        self.server = server
        self.base_url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.base_url, timeout=60)

    @property
    def state(self):
        return self.app.state.pagoda

    def openai(self, api_key: str = "none", **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0,
                             timeout=120, **kw)

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of /metrics (0 when absent)."""
        text = self.http.get("/metrics").text
        pattern = rf"^{re.escape(name)}{re.escape(labels) if labels else ''}\s+(\S+)$"
        found = re.search(pattern, text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until the engine runs nothing and holds no KV block."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.state.engine.stats
            if s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0:
                return
            time.sleep(0.05)
        raise AssertionError(f"engine still busy after {timeout}s: {self.state.engine.stats}")


@contextmanager
def serve(loaded, settings=None) -> Iterator[LiveServer]:
    """Run create_app(loaded, settings) with uvicorn on a free loopback port until exit."""
    import uvicorn

    from pagoda.serve import create_app

    app = create_app(loaded, settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    live = LiveServer(app, server, port)
    try:
        yield live
    finally:
        live.http.close()
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def tiny_loaded(tokenizer, max_seq_len: int = 256):
    """A random tiny Llama (2 layers, d=64) that speaks SmolLM2's vocabulary."""
    import torch

    from pagoda.hub.loader import LoadedModel
    from pagoda.model.config import ModelConfig
    from pagoda.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-llama", vocab_size=tokenizer.vocab_size,
                                max_seq_len=max_seq_len, init_std=0.3)
    return LoadedModel(name="tiny-random", path=Path("tiny-random"),
                       model=Transformer(cfg).eval(), tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny(smol):
    return tiny_loaded(smol.tokenizer)


@pytest.fixture(scope="session")
def smol_server(smol) -> Iterator[LiveServer]:
    """The real SmolLM2-135M-Instruct behind the API (no auth), answers capped at 48 tokens."""
    from pagoda.serve import ServeSettings

    settings = ServeSettings(default_max_tokens=48,
                             engine={"max_running": 8, "kv_cache_tokens": 8192})
    with serve(smol, settings) as live:
        yield live


@pytest.fixture(scope="session")
def tiny_server(tiny) -> Iterator[LiveServer]:
    from pagoda.serve import ServeSettings

    settings = ServeSettings(engine={"max_running": 4, "kv_cache_tokens": 2048})
    with serve(tiny, settings) as live:
        yield live


@pytest.fixture
def start_server() -> Iterator[Callable]:
    """start_server(loaded, settings) -> LiveServer, stopped when the test ends."""
    stack = []

    def start(loaded, settings=None) -> LiveServer:
        cm = serve(loaded, settings)
        live = cm.__enter__()
        stack.append(cm)
        return live

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)
