"""Structured access log: one JSON line per request on the `pagoda.serve.access` logger.

Fields: ts, request_id, method, path, status, latency_s, and for generation requests model,
prompt_tokens, completion_tokens, finish_reasons, time to first token; `disconnected` when the
client left before the response ended. Prompt text is logged only with `log_prompts` on.

`AccessLogMiddleware` is plain ASGI (not BaseHTTPMiddleware) so it sees the end of streamed
responses and never buffers them; it also assigns the request id (the client's X-Request-Id if
it sent a sane one), returns it in the `x-request-id` header, and counts requests/latency for
the metrics.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from pagoda.serve.metrics import ServeMetrics

access_log = logging.getLogger("pagoda.serve.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def new_request_id() -> str:
    """A fresh random request id (32 hex digits)."""
    return uuid.uuid4().hex


class JsonLineFormatter(logging.Formatter):
    """Format records as one JSON object per line (access records are JSON already)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == access_log.name:
            return record.getMessage()
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: int = logging.INFO) -> None:
    """Send pagoda.serve's logs to stderr as JSON lines (used by `pagoda serve`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLineFormatter())
    logger = logging.getLogger("pagoda.serve")
    logger.handlers[:] = [handler]
    logger.setLevel(level)


class AccessLogMiddleware:
    """ASGI middleware: request id, JSON access log line and request metrics."""

    def __init__(self, app: Any, metrics: ServeMetrics, log_prompts: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.log_prompts = log_prompts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        sent_id = next((v.decode("latin-1") for k, v in scope.get("headers", ())
                        if k == b"x-request-id"), "")
        request_id = sent_id if _SANE_ID.match(sent_id) else new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        info: dict[str, Any] = {"status": 500, "complete": False}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                info["complete"] = True

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._record(scope, state, request_id, info, time.perf_counter() - start)

    def _record(self, scope: dict, state: dict, request_id: str, info: dict,
                latency: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or ("static" if scope.get("app_root_path")
                                                    is not None else "other")
        status = info["status"]
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(latency)
        entry: dict[str, Any] = {
            "ts": round(time.time(), 3), "request_id": request_id, "method": scope["method"],
            "path": scope["path"], "status": status, "latency_s": round(latency, 4)}
        if not info["complete"]:
            entry["disconnected"] = True
        gen = state.get("generation")
        if gen:
            entry.update({k: v for k, v in gen.items() if k != "prompt"})
            if self.log_prompts and "prompt" in gen:
                entry["prompt"] = gen["prompt"]
        access_log.info(json.dumps(entry, ensure_ascii=False, default=str))
