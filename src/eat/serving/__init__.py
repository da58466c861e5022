"""Serving EAT models: `eat serve` (FastAPI + uvicorn with an asyncio dynamic batcher) and a Ray Serve deployment.

Modules: :mod:`.config` (ServeConfig), :mod:`.model` (Predictor: encode rows, run a batch, answer rows as they
exit), :mod:`.batcher` (DynamicBatcher, no HTTP), :mod:`.protocol` (request/response format), :mod:`.metrics`
(Prometheus), :mod:`.app` (the FastAPI app and uvicorn runner), :mod:`.ray_app` (Ray Serve). See docs/serving.md.
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
