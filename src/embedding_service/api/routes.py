"""Thin HTTP handlers: parse, call the engine, encode. No model logic lives here."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from .. import __version__, tracing
from ..config import EmbeddingConfig
from ..engine.input_types import resolve_input_type
from ..engine.types import MULTIVECTOR, SPARSE, EngineState
from ..errors import ErrorKind, ServiceError
from .access import CLIENT_ID_KEY
from .body import read_json_body
from .embed_headers import EMBED_HEADERS, embed_headers
from .multivector_routes import multivector_embeddings
from .openapi import EMBEDDING_ERRORS, operation_doc
from .protocol import (
    EMBEDDING_EXAMPLES,
    EmbeddingRequest,
    encode_embeddings,
    parse_embedding_request,
    parse_json_body,
)
from .ratelimit import TOKEN_ADMISSION_KEY
from .schemas import EmbeddingResponse, Health, Liveness, ModelCard, ModelList, Readiness, ServiceInfo
from .served import ServedModels
from .sparse_routes import sparse_embeddings
from .tiktoken_ids import TiktokenDecoder

__all__ = ["RouteOptions", "ServiceContext", "build_router"]

_JSON = "application/json"


@dataclass(frozen=True)
class RouteOptions:
    """The settings the handlers read (defaults live in EmbeddingConfig only)."""

    gpu_memory_utilization: float  # reported by /health, as the spec's example shows
    max_model_len: int  # reported by /health until the model has loaded
    max_body_bytes: int
    requested_device: str
    input_type_strict: bool = False  # 400 for an input_type the model has no prompt for

    @classmethod
    def from_config(cls, settings: EmbeddingConfig) -> RouteOptions:
        return cls(gpu_memory_utilization=settings.gpu_memory_utilization, max_model_len=settings.max_model_len,
                   max_body_bytes=settings.max_body_bytes, requested_device=settings.device,
                   input_type_strict=settings.input_type_strict)


class ServiceContext:
    """What the handlers need: the served models, the options, and the token-id decoder when configured."""

    def __init__(self, served: ServedModels, options: RouteOptions,
                 token_ids_decoder: TiktokenDecoder | None = None) -> None:
        self.served = served
        self.engine = served.primary.engine  # the first model: /health's top level and GET /
        self.model_name = served.primary.name
        self.options = options
        self.created = int(time.time())
        self.token_ids_decoder = token_ids_decoder


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


def build_router(ctx: ServiceContext) -> APIRouter:
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

    async def embeddings(request: Request) -> Response:
        with ctx.engine.accepted():  # accepted from here: a drain waits for the body to arrive
            data = parse_json_body(await read_json_body(request, ctx.options.max_body_bytes))
            named = data.get("model") if isinstance(data, dict) else None
            task = ctx.served.task_for_embeddings(named if isinstance(named, str) else None)
            if task == SPARSE:
                return await sparse_embeddings(ctx.served, request, data)
            if task == MULTIVECTOR:
                return await multivector_embeddings(ctx.served, request, data)
            # The model asked for (404 for an unknown name among several, 400 for a reranker's name).
            chosen, engine = ctx.served.for_embed(named if isinstance(named, str) else None)
            decoder = ctx.token_ids_decoder
            embed_request, encoding = parse_embedding_request(data, token_ids_are_text=decoder is not None)
            if decoder is not None:
                embed_request = decoder.to_text(embed_request)
            embed_request.request_id = request.headers.get("x-request-id")
            embed_request.client_id = request.scope.get(CLIENT_ID_KEY)  # (a per-key result cache)
            admission = request.scope.get(TOKEN_ADMISSION_KEY)  # token rate limit, if on
            if admission is not None:
                admission.check()  # a client in debt is refused before its texts are tokenised
                embed_request.admit, embed_request.charge_refused = admission, admission.charge
            with engine.accepted(admitted=True) as info:  # (accepted above, before its body)
                embed_request.instruction, embed_request.prompt_name = resolve_input_type(  # the chosen model's
                    embed_request.input_type, instruction=embed_request.instruction,
                    prompt_name=embed_request.prompt_name, prompts=info.prompts,
                    strict=ctx.options.input_type_strict)
                if tracing.TRACER is not None:
                    tracing.set_attributes({"embedding.model": chosen.name, "embedding.texts": embed_request.count})
                result = await engine.embed_accepted(embed_request, info)
        with tracing.span("serialize") as traced:
            body = encode_embeddings(result.vectors, encoding, chosen.name, result.prompt_tokens)
            if traced is not None:
                traced.set_attributes({"embedding.encoding": encoding, "embedding.bytes": len(body)})
        return Response(body, media_type=_JSON, headers=embed_headers(result))

    for path, summary in (("/v1/embeddings", "Create embeddings (OpenAI format)"),
                          ("/embeddings", "Create embeddings (the same, at the spec's short path)")):
        router.add_api_route(path, embeddings, methods=["POST"], **operation_doc(
            summary, response=EmbeddingResponse, errors=EMBEDDING_ERRORS, body=EmbeddingRequest,
            body_examples=EMBEDDING_EXAMPLES, headers=EMBED_HEADERS, tags=["embeddings"]))
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
