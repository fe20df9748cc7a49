"""Wires metrics, request context and (when on) tracing into the app: the middleware, the engine hook and
`GET /metrics`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response

from ... import tracing
from ...metrics import CONTENT_TYPE, ServiceMetrics
from ..openapi import operation_doc
from ..served import Served
from .request_context import RequestContextMiddleware

__all__ = ["install_observability"]


def install_observability(app: FastAPI, models: Sequence[Served],
                          closing: Callable[[], bool] | None = None,
                          multiprocess_dir: str | None = None) -> ServiceMetrics:
    """Add request ids, timing headers and Prometheus metrics to `app` (and `Connection: close` while
    `closing()`). Call after the other middleware, so that this one is outermost and also sees (and counts)
    the error middleware's 500s. `multiprocess_dir`: /metrics shows every process's (api_processes > 1)."""
    metrics = ServiceMetrics(multiprocess_dir)
    for model in models:
        metrics.add_model(model.name, model.engine, model.task)
    app.state.metrics = metrics
    if tracing.TRACER is not None:  # inside the request context: its span has the request id
        from .tracing import TracingMiddleware

        app.add_middleware(TracingMiddleware)
    app.add_middleware(RequestContextMiddleware, observer=metrics.observe_request, closing=closing)
    router = APIRouter()

    @router.get("/metrics", response_class=Response, **operation_doc(
        "Prometheus metrics of this server", media_type="text/plain", tags=["service"]))
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(router)
    return metrics
