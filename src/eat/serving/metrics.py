"""Prometheus metrics of the service (``GET /metrics``), on a registry of its own (several apps in one process,
as in the tests, do not share counters)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0,
                   2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ServeMetrics:
    """Request counts by route and status, request latency, batch sizes (rows and padded tokens), exit layers,
    rows answered early, row errors and queue depth."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, num_layers: int, queue_depth: Callable[[], float] | None = None):
        self.registry = CollectorRegistry()
        self.requests = Counter("eat_requests", "HTTP requests by route and status code", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("eat_request_latency_seconds", "Time from a request's arrival to its answer",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_rows = Histogram("eat_batch_rows", "Rows per model batch", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.batch_tokens = Histogram("eat_batch_padded_tokens", "Padded tokens (rows x longest row) per batch",
                                      buckets=TOKEN_BUCKETS, registry=self.registry)
        self.exit_layer = Histogram("eat_exit_layer", "Layer each classified row left the model at",
                                    buckets=tuple(range(1, num_layers + 1)), registry=self.registry)
        self.rows = Counter("eat_rows", "Rows answered (including rows answered with an error)",
                            registry=self.registry)
        self.early_rows = Counter("eat_rows_answered_early",
                                  "Rows answered while other rows of their batch were still running",
                                  registry=self.registry)
        self.row_errors = Counter("eat_row_errors", "Rows answered with a model error", registry=self.registry)
        self.queue_depth = Gauge("eat_queue_depth_rows", "Rows waiting for a batch", registry=self.registry)
        if queue_depth is not None:
            self.queue_depth.set_function(queue_depth)

    def observe_batch(self, rows: int, padded_tokens: int) -> None:
        """One batch started."""
        self.batch_rows.observe(rows)
        self.batch_tokens.observe(padded_tokens)

    def observe_answer(self, answer: dict[str, Any], early: bool) -> None:
        """One row answered."""
        self.rows.inc()
        if "error" in answer:
            self.row_errors.inc()
            return
        if early:
            self.early_rows.inc()
        layer = answer.get("exit_layer")
        if isinstance(layer, int):
            self.exit_layer.observe(layer)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """One HTTP request answered."""
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


__all__ = ["ServeMetrics"]
