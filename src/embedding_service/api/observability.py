"""Wires metrics and request context into the app: the middleware, the engine hook and `GET /metrics`."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response

from ..engine.core import EngineCore
from ..metrics import CONTENT_TYPE, ServiceMetrics
from .openapi import operation_doc
from .request_context import RequestContextMiddleware

__all__ = ["install_observability"]


def install_observability(app: FastAPI, engine: EngineCore | None,
                          closing: Callable[[], bool] | None = None) -> ServiceMetrics:
    """Add request ids, timing headers and Prometheus metrics to `app` (and `Connection: close` while
    `closing()`). Call after the other middleware, so that this one is outermost and also sees (and counts)
    the error middleware's 500s."""
    metrics = ServiceMetrics(engine)
    app.state.metrics = metrics
    app.add_middleware(RequestContextMiddleware, observer=metrics.observe_request, closing=closing)
    router = APIRouter()

    @router.get("/metrics", response_class=Response, **operation_doc(
        "Prometheus metrics of this process", media_type="text/plain", tags=["service"]))
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(router)
    return metrics
