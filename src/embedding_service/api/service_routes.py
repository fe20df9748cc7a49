"""The service's own routes: GET / (generated from the app's routes), the health probes and /v1/models."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from .. import __version__
from ..engine.types import EngineState
from ..errors import ErrorKind, ServiceError
from .context import ServiceContext
from .openapi import operation_doc
from .schemas import Health, Liveness, ModelCard, ModelList, Readiness, ServiceInfo

__all__ = ["build_service_router"]

_JSON = "application/json"


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type=_JSON, headers=headers)


def _model_health(ctx: ServiceContext) -> list[dict[str, Any]]:
    out = []
    for served in ctx.served.all:
        info = served.engine.info
        out.append({"model": served.name, "task": served.task, "status": served.engine.state.value,
                    "engine": info.engine if info else None, "device": info.device if info else None,
                    "dtype": info.dtype if info else None, "max_model_len": info.max_model_len if info else None,
                    **({"error": served.engine.death} if served.engine.death else {})})
    return out


def _worst_state(ctx: ServiceContext) -> EngineState:
    """The service is healthy when every model is; else the first model's state that is not."""
    return next((s.engine.state for s in ctx.served.all if s.engine.state is not EngineState.HEALTHY),
                EngineState.HEALTHY)


def _endpoints(request: Request) -> list[str]:
    """Every documented path of the app, from its routes (so a new endpoint can never be missing here)."""
    paths = (getattr(route, "path", None) for route in request.app.routes
             if getattr(route, "include_in_schema", False))
    return sorted({path for path in paths if path}, key=lambda p: (p != "/health", p))


def build_service_router(ctx: ServiceContext) -> APIRouter:
    router = APIRouter()

    @router.get("/", **operation_doc("Service information", response=ServiceInfo, tags=["service"]))
    async def info(request: Request) -> Response:
        engine = ctx.engine
        return _json({
            "name": "embedding-service",
            "version": __version__,
            "model": ctx.model_name,
            "status": engine.state.value,
            "engine": engine.info.engine if engine.info else None,
            "dimension": engine.info.dimension if engine.info else None,
            "endpoints": _endpoints(request),
        })

    @router.get("/health", **operation_doc(
        "Health check: 200 when serving, 503 while loading, draining or failed", response=Health, tags=["service"],
        responses={503: {"description": "not serving: loading, draining or unhealthy (the same body)",
                         "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Health"}}}}}))
    async def health() -> Response:
        engine, opts = ctx.engine, ctx.options
        info = engine.info
        body: dict[str, Any] = {
            "status": engine.state.value,
            "model": ctx.model_name,
            "gpu_memory_utilization": opts.gpu_memory_utilization,
            "max_model_len": info.max_model_len if info else opts.max_model_len,
            "device": info.device if info else (None if opts.requested_device == "auto" else opts.requested_device),
            "engine": info.engine if info else None,
            "dtype": info.dtype if info else None,
            "dimension": info.dimension if info else None,
        }
        models = _model_health(ctx)
        if len(models) > 1:
            body["models"] = models
        state = _worst_state(ctx)
        body["status"] = state.value
        deaths = [s.engine.death for s in ctx.served.all if s.engine.death]
        if deaths:  # which model died and why, for whoever reads the probe before the restart
            body["error"] = "; ".join(deaths)
        return _json(body, 200 if state is EngineState.HEALTHY else 503)

    # HEAD too (load balancers and uptime checkers probe with it): the same answer, the server drops the body.
    router.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @router.get("/health/live", **operation_doc(
        "Liveness probe: 200 while the process answers (loading, serving or draining)", response=Liveness,
        tags=["service"]))
    async def live() -> Response:
        return _json({"status": "alive"})

    @router.get("/health/ready", **operation_doc(
        "Readiness probe: 200 when every model is loaded and the server is not draining, else 503",
        response=Readiness, tags=["service"],
        responses={503: {"description": "not ready: a model loading or failed, or draining (the same body)",
                         "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Readiness"}}}}}))
    async def ready() -> Response:
        state = _worst_state(ctx)
        body = {"status": "ready" if state is EngineState.HEALTHY else state.value,
                "models": {s.name: s.engine.state.value for s in ctx.served.all}}
        return _json(body, 200 if state is EngineState.HEALTHY else 503)

    @router.get("/v1/models", **operation_doc("Models served (OpenAI list shape)", response=ModelList,
                                              tags=["models"]))
    async def models() -> Response:
        return _json({"object": "list", "data": _model_cards(ctx)})

    @router.get("/v1/models/{model_id:path}", **operation_doc("One served model", response=ModelCard,
                                                              errors=[ErrorKind.NOT_FOUND], tags=["models"]))
    async def model(model_id: str = Path(description="a model id", examples=[ctx.model_name])) -> Response:
        cards = _model_cards(ctx)
        card = next((c for c in cards if model_id == c["id"] or model_id in c.get("aliases", ())), None)
        if card is None:
            names = "', '".join(c["id"] for c in cards)
            raise ServiceError(ErrorKind.NOT_FOUND, f"model '{model_id}' is not served here; "
                               f"this server serves '{names}'", param="model", code="model_not_found")
        return _json(card)

    return router


def _model_cards(ctx: ServiceContext) -> list[dict[str, Any]]:
    cards = []
    for served in ctx.served.all:
        info = served.engine.info
        cards.append({"id": served.name, "object": "model", "created": ctx.created, "owned_by": "embedding-service",
                      "task": served.task, **({"aliases": list(served.aliases)} if served.aliases else {}),
                      "max_model_len": info.max_model_len if info else None,
                      **({"dimensions": info.dimension} if info and served.task == "embed" else {})})
    return cards
