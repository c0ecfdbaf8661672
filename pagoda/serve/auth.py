"""API keys (Bearer) and a per-key token-bucket rate limit for /v1/*.

Safe by default: with no key configured the server binds 127.0.0.1 only and says so; binding any
other address without keys is refused with a message telling the user to set keys.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time

from fastapi import Request

from pagoda.errors import ConfigError
from pagoda.serve.errors import AuthenticationError, PermissionDeniedError, RateLimitError
from pagoda.serve.settings import LOOPBACK_HOSTS, ServeSettings

log = logging.getLogger("pagoda.serve")


def check_bind(settings: ServeSettings) -> None:
    """Refuse a non-loopback address without API keys; log when serving without keys."""
    if settings.auth_enabled:
        log.info("API keys configured (%d); /v1/* needs 'Authorization: Bearer KEY'",
                 len(settings.api_keys))
        return
    if settings.host not in LOOPBACK_HOSTS:
        raise ConfigError(
            f"refusing to serve on {settings.host} without an API key: anyone who can reach it "
            "could use the model. Set keys with --api-key KEY, PAGODA_API_KEYS=key1,key2 or "
            "api_keys in the --config file, or bind 127.0.0.1")
    log.warning("no API key configured: serving on %s only (loopback); set --api-key or "
                "PAGODA_API_KEYS to serve other hosts", settings.host)


class TokenBucket:
    """`rate` requests per minute per key, in bursts of up to `rate` (thread-safe)."""

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.refill_per_s = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Spend one request of `key`'s allowance; return 0, or seconds until one is available."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.refill_per_s)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.refill_per_s


class Guard:
    """Checks one request's key and rate; used as a FastAPI dependency on /v1/* routes."""

    def __init__(self, settings: ServeSettings) -> None:
        self.keys = [k.encode() for k in [*settings.api_keys, *settings.admin_keys]]
        self.admin_keys = [k.encode() for k in settings.admin_keys]
        self.limit = settings.rate_limit_per_minute
        self.bucket = TokenBucket(self.limit) if self.limit else None

    def key_of(self, request: Request) -> str | None:
        """The accepted key sent with the request; None when auth is off."""
        if not self.keys:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, sent = header.partition(" ")
        if not header:
            raise AuthenticationError(
                "You didn't provide an API key. Send it in the Authorization header: "
                "'Authorization: Bearer YOUR_KEY'.")
        if scheme.lower() != "bearer" or not sent.strip():
            raise AuthenticationError(
                "The Authorization header must be 'Bearer YOUR_KEY'.")
        sent_b = sent.strip().encode()
        # compare against every key (no early exit) so timing does not tell which one is close
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(sent_b, key)
        if not ok:
            raise AuthenticationError(f"Incorrect API key provided: {_redact(sent.strip())}.")
        return sent.strip()

    def require_admin(self, request: Request) -> None:
        """Let only admin keys through (anyone local when auth is off: loopback only)."""
        key = self.key_of(request)
        if key is None:
            return
        ok = False
        for admin in self.admin_keys:  # no early exit, as in key_of
            ok |= hmac.compare_digest(key.encode(), admin)
        if not ok:
            raise PermissionDeniedError("This API key may not manage adapters; use one of the "
                                        "server's admin_keys.")

    async def __call__(self, request: Request) -> None:
        key = self.key_of(request)
        if self.bucket is None:
            return
        who = key if key is not None else f"addr:{request.client.host if request.client else '?'}"
        wait = self.bucket.take(who)
        if wait:
            raise RateLimitError(
                f"Rate limit reached: {self.limit} requests per minute for this "
                f"{'API key' if key else 'client'}. Retry in {wait:.1f}s.", retry_after=wait)


def _redact(key: str) -> str:
    """Show a wrong key as OpenAI does: its first and last few characters only."""
    return key[:3] + "*" * 4 + key[-4:] if len(key) > 10 else "*" * len(key)
