"""The single-machine service: a FastAPI app over :class:`DynamicBatcher`, run by uvicorn.

Routes: ``POST /v1/classify`` (sentence classifiers), ``POST /v1/tag`` (sequence labelling), ``GET /health``
(200 once the model is loaded and warmed up, else 503), ``GET /metrics`` (Prometheus text format).
Shutdown (SIGTERM or Ctrl-C): uvicorn stops accepting connections and waits for the requests in flight; the
batcher then answers whatever is still queued before the process exits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .batcher import BatcherClosed, DynamicBatcher, QueueFull, RowTiming
from .config import ServeConfig
from .metrics import ServeMetrics
from .model import Predictor
from .protocol import RequestError, encode_rows, parse_request, response_body, wrong_kind_message

logger = logging.getLogger(__name__)


def create_app(predictor: Predictor, config: ServeConfig | None = None) -> FastAPI:
    """A FastAPI app serving ``predictor`` with the batching and limits of ``config``. The model is warmed up
    in the background at startup; ``/health`` says 503 until that is done, and so does every model route."""
    config = (config or ServeConfig()).validate()
    state: dict[str, Any] = {"ready": False, "closing": False}
    metrics = ServeMetrics(predictor.num_layers)
    batcher = DynamicBatcher(predictor.run, max_batch=config.max_batch, max_batch_tokens=config.max_batch_tokens,
                             max_wait_ms=config.max_wait_ms, max_queue=config.max_queue,
                             on_batch=metrics.observe_batch, on_answer=metrics.observe_answer)
    metrics.queue_depth.set_function(lambda: batcher.queue_depth)

    async def warm_up() -> None:
        try:
            await asyncio.to_thread(predictor.warmup)
        except Exception as error:  # noqa: BLE001 - reported by /health; the server stays up to say so
            logger.exception("warm-up failed")
            state["error"] = f"warm-up failed: {type(error).__name__}: {error}"
            return
        state["ready"] = True
        logger.info("model warmed up; ready")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        warm = asyncio.create_task(warm_up())
        yield
        state["closing"] = True
        await warm
        await batcher.close()  # answers every row already accepted

    app = FastAPI(title="EAT", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.metrics, app.state.predictor, app.state.config = batcher, metrics, predictor, config
    retry = {"Retry-After": str(config.retry_after_s)}

    async def handle(request: Request, route: str, phases: dict[str, float]) -> tuple[int, dict[str, Any],
                                                                                 dict[str, str]]:
        """Answer one request: (status, JSON body, headers). ``phases`` gets the seconds spent reading and
        tokenizing (``parse``), waiting for a batch (``queue``, the request's slowest row) and in the model
        (``model``, likewise)."""
        if state["closing"]:
            return 503, {"error": "the server is shutting down"}, retry
        if not state["ready"]:
            return 503, {"error": state.get("error", "the model is warming up")}, retry
        if predictor.kind != route:
            return 404, {"error": wrong_kind_message(predictor.kind)}, {}
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            return 413, {"error": f"the body has {declared} bytes; at most {config.max_body_bytes} "
                                  "(--max-body-bytes)"}, {}
        body = bytearray()
        async for chunk in request.stream():  # a chunked upload has no Content-Length: stop at the limit
            body += chunk
            if len(body) > config.max_body_bytes:
                return 413, {"error": f"the body has more than {config.max_body_bytes} bytes "
                                      "(--max-body-bytes)"}, {}
        parse_start = time.perf_counter()
        try:
            parsed = parse_request(bytes(body), max_rows=config.max_rows_per_request,
                                   max_body_bytes=config.max_body_bytes)
            rows = encode_rows(parsed, predictor.encode)
        except RequestError as error:
            return error.status, {"error": error.message}, {}
        phases["parse"] = time.perf_counter() - parse_start
        timings = [RowTiming() for _ in rows]
        try:
            futures = batcher.submit(rows, [row.tokens for row in rows], timings)
        except QueueFull as error:
            return 503, {"error": str(error)}, retry
        except BatcherClosed as error:
            return 503, {"error": str(error)}, retry
        answers = await asyncio.gather(*futures)
        phases["queue"] = max(timing.queue_s for timing in timings)
        phases["model"] = max(timing.model_s for timing in timings)
        status, body = response_body(parsed.id, list(answers))
        return status, body, {}

    async def answer(request: Request, route: str) -> JSONResponse:
        start = time.perf_counter()
        phases: dict[str, float] = {}
        status, body, headers = await handle(request, route, phases)
        elapsed = time.perf_counter() - start
        metrics.observe_request(route, status, elapsed)
        # where the time went, in the W3C Server-Timing format (ms): a client can tell the server's share of a
        # request's latency from the network's and its own (benchmarks/serve_load.py --overhead reads it)
        phases["total"] = elapsed
        headers = {**headers, "Server-Timing": ", ".join(f"{name};dur={seconds * 1000.0:.3f}"
                                                         for name, seconds in phases.items())}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        """Classify one text, a pair, or a list of them: label, probabilities, exit layer, tokens kept."""
        return await answer(request, "classify")

    @app.post("/v1/tag")
    async def tag(request: Request) -> JSONResponse:
        """Tag every whitespace-separated word of one text or a list of texts (token-classification models)."""
        return await answer(request, "tag")

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 with the model's description once it is warmed up; 503 while warming up or shutting down."""
        status = "shutting down" if state["closing"] else "ready" if state["ready"] else \
            state.get("error", "warming up")
        code = 200 if status == "ready" else 503
        metrics.observe_request("health", code, 0.0)
        return JSONResponse({"status": status, "kind": predictor.kind, "labels": predictor.labels,
                             "layers": predictor.num_layers, "model": predictor.description,
                             "config": dataclasses.asdict(config)},
                            status_code=code, headers=retry if code == 503 else {})

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text format: requests by route and status, latency, batch sizes, exit layers, queue depth."""
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def run_server(predictor: Predictor, config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info") -> None:
    """Serve ``predictor`` with uvicorn until SIGTERM / Ctrl-C (then: stop accepting, answer everything accepted,
    exit)."""
    import uvicorn

    uvicorn.run(create_app(predictor, config), host=host, port=port, log_level=log_level, access_log=False,
                timeout_graceful_shutdown=None)


__all__ = ["create_app", "run_server"]
