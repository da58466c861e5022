"""The same service on Ray Serve: N replicas (on one machine or a cluster), batching by Ray Serve's ``serve.batch``.

Each replica loads the model with :func:`eat.serving.model.load_predictor` and answers ``POST /v1/classify``,
``POST /v1/tag`` and ``GET /health`` with the request format and answers of the single-machine server
(:mod:`eat.serving.protocol`). Batches hold at most ``max_batch`` rows and ``max_batch_tokens`` padded tokens:
``batch_size_fn`` counts a batch as the larger of its rows and its padded tokens scaled to rows.

Differences from `eat serve` without ``--ray``: Ray Serve hands a batch's answers back when the batch ends (no
early answer for rows that exit early; they still leave the batch, so it runs cheaper), ``/metrics`` is Ray's own
metrics export (not this service's), and a full queue is Ray Serve's ``max_queued_requests`` (503).
"""

from __future__ import annotations

import asyncio
import math
import signal
import threading
from pathlib import Path
from typing import Any

from .config import ServeConfig


def _batch_cost(config: ServeConfig):
    """``batch_size_fn`` for serve.batch: a batch's size is max(rows, padded tokens x max_batch / max_batch_tokens),
    so ``<= max_batch`` means at most max_batch rows and at most max_batch_tokens padded tokens."""

    def size(rows: list) -> int:
        width = max((row.tokens for row in rows), default=0)
        return max(len(rows), math.ceil(len(rows) * width * config.max_batch / config.max_batch_tokens))

    return size


def build_ray_app(checkpoint: str | Path, *, config: ServeConfig, replicas: int = 1, tuned: str | Path | None = None,
                  knobs: dict[str, Any] | None = None, precision: str = "fp32", backend: str = "torch",
                  threads: int | None = None, replica_cpus: float = 1.0):
    """A Ray Serve application: ``replicas`` copies of the model behind Ray Serve's HTTP proxy."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    config = config.validate()
    checkpoint, tuned = str(checkpoint), None if tuned is None else str(tuned)

    @serve.deployment(name="eat", num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus},
                      max_ongoing_requests=max(config.max_batch * 2, 8), max_queued_requests=config.max_queue)
    class EATService:
        """One replica: the model, its tokenizer, and Ray Serve's batching of single rows."""

        def __init__(self) -> None:
            from .model import load_predictor

            self.predictor = load_predictor(checkpoint, tuned=tuned, knobs=knobs, precision=precision,
                                            backend=backend, threads=threads, max_length=config.max_length)
            self.predictor.warmup()

        @serve.batch(max_batch_size=config.max_batch, batch_wait_timeout_s=config.max_wait_ms / 1000.0,
                     batch_size_fn=_batch_cost(config))
        async def _answer_rows(self, rows: list) -> list[dict[str, Any]]:
            return await asyncio.to_thread(run_rows, self.predictor, rows)

        async def __call__(self, request: Request) -> JSONResponse:
            """Route a request: /health, or /v1/classify and /v1/tag with the single-machine server's format."""
            from .protocol import RequestError, encode_rows, parse_request, response_body, wrong_kind_message

            path = request.url.path.rstrip("/")
            predictor = self.predictor
            if path == "/health":
                return JSONResponse({"status": "ready", "kind": predictor.kind, "labels": predictor.labels,
                                     "layers": predictor.num_layers, "model": predictor.description})
            route = path.rsplit("/", 1)[-1]
            if path not in ("/v1/classify", "/v1/tag") or request.method != "POST":
                return JSONResponse({"error": f"no route {request.method} {path}; use POST /v1/classify, "
                                              "POST /v1/tag or GET /health"}, status_code=404)
            if route != predictor.kind:
                return JSONResponse({"error": wrong_kind_message(predictor.kind)}, status_code=404)
            try:
                parsed = parse_request(await request.body(), max_rows=config.max_rows_per_request,
                                       max_body_bytes=config.max_body_bytes)
                rows = encode_rows(parsed, predictor.encode)
            except RequestError as error:
                return JSONResponse({"error": error.message}, status_code=error.status)
            answers = await asyncio.gather(*(self._answer_rows(row) for row in rows))
            status, body = response_body(parsed.id, list(answers))
            return JSONResponse(body, status_code=status)

    return EATService.bind()


def run_rows(predictor, rows: list) -> list[dict[str, Any]]:
    """Answer a batch with ``predictor.run``; if the model call raises, re-run the rows one by one so that only a
    row that fails alone gets ``{"error": ...}``."""
    answers: list[dict[str, Any] | None] = [None] * len(rows)

    def deliver(indices, batch_answers) -> None:
        for i, answer in zip(indices, batch_answers):
            answers[i] = answer

    try:
        predictor.run(rows, deliver)
    except Exception:  # noqa: BLE001 - a model error on one row must not fail the others
        for i in [i for i, answer in enumerate(answers) if answer is None]:
            try:
                predictor.run([rows[i]], lambda _, got, i=i: deliver([i], got))
            except Exception as error:  # noqa: BLE001
                answers[i] = {"error": f"model error: {type(error).__name__}: {error}"}
    return [answer if answer is not None else {"error": "internal error: no answer"} for answer in answers]


def serve_on_ray(checkpoint: str | Path, *, config: ServeConfig, address: str | None = None, replicas: int = 1,
                 host: str = "127.0.0.1", port: int = 8000, **load: Any) -> None:
    """Start (or join, with ``address``) a Ray cluster, deploy the service with ``replicas`` replicas behind Ray
    Serve's proxy on ``host:port``, and block until SIGTERM / Ctrl-C, then shut the application down."""
    import ray
    from ray import serve

    if address:
        ray.init(address=address)
    elif host in ("127.0.0.1", "localhost"):  # a local cluster for a loopback service: keep Ray on loopback too
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
    else:
        ray.init(include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_ray_app(checkpoint, config=config, replicas=replicas, **load), name="eat", route_prefix="/")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"EAT on Ray Serve: {replicas} replica(s) at http://{host}:{port} (SIGTERM or Ctrl-C to stop)", flush=True)
    stop.wait()
    serve.shutdown()  # replicas finish the requests they hold (graceful_shutdown_timeout_s) before they stop
    ray.shutdown()


__all__ = ["build_ray_app", "run_rows", "serve_on_ray"]
