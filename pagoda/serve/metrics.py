"""Prometheus metrics of one server (its own CollectorRegistry, so apps in one process, e.g. in
tests, do not share counters). Scraped at GET /metrics.

Names: pagoda_requests_total{endpoint,status}, pagoda_request_latency_seconds{endpoint},
pagoda_time_to_first_token_seconds, pagoda_inter_token_latency_seconds,
pagoda_prompt_tokens_total, pagoda_generation_tokens_total, pagoda_requests_running,
pagoda_requests_waiting, pagoda_kv_cache_blocks_used, pagoda_kv_cache_blocks_total,
pagoda_kv_cache_usage_ratio, pagoda_kv_cache_blocks_cached, pagoda_prefix_cache_hit_ratio.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)


class ServeMetrics:
    """The server's counters, histograms and gauges."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pagoda_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("pagoda_request_latency_seconds",
                                 "time from request to the last byte of the response",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("pagoda_time_to_first_token_seconds",
                              "time from request to the first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("pagoda_inter_token_latency_seconds",
                             "time between consecutive tokens of one sequence",
                             buckets=_ITL_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pagoda_prompt_tokens", "prompt tokens processed",
                                     registry=r)
        self.generation_tokens = Counter("pagoda_generation_tokens", "tokens generated",
                                         registry=r)
        self.running = Gauge("pagoda_requests_running", "sequences being decoded", registry=r)
        self.waiting = Gauge("pagoda_requests_waiting", "sequences waiting for a slot",
                             registry=r)
        self.kv_used = Gauge("pagoda_kv_cache_blocks_used", "KV-cache blocks in use",
                             registry=r)
        self.kv_total = Gauge("pagoda_kv_cache_blocks_total", "KV-cache blocks in the pool",
                              registry=r)
        self.kv_ratio = Gauge("pagoda_kv_cache_usage_ratio", "KV-cache blocks used / total",
                              registry=r)
        self.kv_cached = Gauge("pagoda_kv_cache_blocks_cached",
                               "KV-cache blocks in the prefix cache (in use or kept for reuse)",
                               registry=r)
        self.prefix_hits = Gauge("pagoda_prefix_cache_hit_ratio",
                                 "share of admitted prompt tokens found in the prefix cache",
                                 registry=r)

    def observe_engine(self, stats: Any) -> None:
        """Copy the engine's EngineStats into the gauges (called at every scrape)."""
        if stats is None:
            return
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_used.set(stats.kv_blocks_used)
        self.kv_total.set(stats.kv_blocks_total)
        self.kv_ratio.set(stats.kv_blocks_used / stats.kv_blocks_total
                          if stats.kv_blocks_total else 0.0)
        self.kv_cached.set(stats.kv_blocks_cached)
        self.prefix_hits.set(stats.prefix_cache_hit_rate)

    def render(self, stats: Any = None) -> bytes:
        """The text exposition format of every metric."""
        self.observe_engine(stats)
        return generate_latest(self.registry)
