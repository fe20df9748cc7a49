"""The ASGI application: routes, error envelopes, and the engine's lifecycle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..backends import create_backend
from ..backends.choice import vllm_fit
from ..backends.resolve import resolve_model_dir
from ..config import EmbeddingConfig
from ..engine.engine import EmbeddingEngine, EngineOptions
from ..engine.types import EngineState
from ..errors import ErrorKind, ServiceError
from .docs import DOCS_PATHS, install_docs
from .lifecycle import CancelOnDisconnect, CloseConnectionsWhile
from .middleware import ErrorEnvelopeMiddleware
from .observability import install_observability
from .openapi import install_openapi
from .routes import ServiceContext, build_router
from .security import install_security
from .tiktoken_ids import TiktokenDecoder

__all__ = ["build_engine", "choose_engine", "create_app", "engine_options"]

log = logging.getLogger("embedding_service")

_HTTP_KINDS = {
    400: ErrorKind.INVALID_REQUEST,
    401: ErrorKind.AUTHENTICATION,
    403: ErrorKind.PERMISSION,
    404: ErrorKind.NOT_FOUND,
    405: ErrorKind.METHOD_NOT_ALLOWED,
    413: ErrorKind.PAYLOAD_TOO_LARGE,
    415: ErrorKind.UNSUPPORTED_MEDIA_TYPE,
    429: ErrorKind.RATE_LIMITED,
    503: ErrorKind.OVERLOADED,
}


def engine_options(settings: EmbeddingConfig) -> EngineOptions:
    return EngineOptions(
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        batch_timeout_ms=settings.batch_timeout_ms,
        max_model_len=settings.max_model_len,
        max_inputs_per_request=settings.max_inputs_per_request,
        max_request_tokens=settings.max_request_tokens,
        truncate=settings.truncate,
        max_queue_requests=settings.max_queue_requests,
        max_queue_tokens=settings.max_queue_tokens,
        request_timeout_s=settings.request_timeout_s,
    )


def choose_engine(settings: EmbeddingConfig, model_dir: str | None = None) -> str:
    """The engine to run: as configured, or for `auto` vLLM where installed and a fit, else torch (logged).

    Quantised arithmetic is never chosen for the user: only `quantize` set makes `auto` pick openvino.
    """
    if settings.engine != "auto":
        return settings.engine
    if settings.quantize != "none":
        log.info("engine auto: quantize=%s was asked for: using the openvino engine", settings.quantize)
        return "openvino"
    use_vllm, why = vllm_fit(model_dir, settings.device)
    log.info("engine auto: %s: using %s", why, "vLLM" if use_vllm else "the transformers/torch engine")
    return "vllm" if use_vllm else "torch"


def build_engine(settings: EmbeddingConfig, model_dir: str | None = None) -> EmbeddingEngine:
    """The engine `settings` describe. Resolves (and if needed downloads) the model unless given a dir."""
    if model_dir is None and settings.engine != "fake":
        model_dir = resolve_model_dir(settings.model_name, settings.model_path, settings.demo)
    kind = choose_engine(settings, model_dir)
    backend = create_backend(
        kind,
        model_dir or settings.model_source,
        model_label=settings.public_model_name,
        device=settings.device,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        matryoshka=settings.matryoshka_listed,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        fake_options=_fake_options(settings) if kind == "fake" else None,
        enforce_eager=settings.enforce_eager,
        vllm_engine_core=settings.vllm_engine_core,
        quantize=settings.quantize,
        openvino_cache_dir=settings.openvino_cache_dir,
    )
    return EmbeddingEngine(backend, engine_options(settings))


def _fake_options(settings: EmbeddingConfig) -> dict[str, object]:
    """Fault-injection knobs of the fake engine, so tests can drive a server process from its flags."""
    return {"delay_s": settings.fake_delay_ms / 1000.0, "fail_batches": settings.fake_fail_batches,
            "die_after": settings.fake_die_after, "load_delay_s": settings.fake_load_delay_ms / 1000.0}


def _error_response(exc: ServiceError) -> Response:
    return Response(orjson.dumps(exc.body()), status_code=exc.status, media_type="application/json",
                    headers=exc.headers or None)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> Response:
        if exc.status >= 500:
            log.warning("request failed: %s", exc.message)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        param = ".".join(loc) or None
        return _error_response(ServiceError(ErrorKind.INVALID_REQUEST,
                                            f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = _HTTP_KINDS.get(exc.status_code, ErrorKind.INTERNAL if exc.status_code >= 500
                               else ErrorKind.INVALID_REQUEST)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        error = ServiceError(kind, message, headers=dict(exc.headers or {}))
        response = _error_response(error)
        response.status_code = exc.status_code
        return response



def create_app(
    settings: EmbeddingConfig,
    engine: EmbeddingEngine | None = None,
    *,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The application. Without `engine`, builds the one `settings` describe (tests pass a fake one)."""
    engine = engine if engine is not None else build_engine(settings)
    ctx = ServiceContext(
        engine,
        model_name=settings.public_model_name,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        max_model_len=settings.max_model_len,
        max_body_bytes=settings.max_body_bytes,
        requested_device=settings.device,
    )
    ctx.api_docs = settings.api_docs
    if settings.token_ids_tiktoken:
        ctx.token_ids_decoder = TiktokenDecoder(settings.token_ids_tiktoken)

    async def load() -> None:
        try:
            await engine.start()
        except Exception as exc:
            log.error("model load failed: %s", exc)
            if on_fatal is not None:
                on_fatal(exc)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.get_running_loop().create_task(load(), name="model-load")
        try:
            yield
        finally:
            if not loader.done():
                loader.cancel()
            await engine.drain(settings.shutdown_timeout)
            await engine.stop()

    # FastAPI's own /docs and /redoc load their scripts from a CDN: ours (api/docs.py) are served offline.
    app = FastAPI(title="Embedding Service", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible text embeddings", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(ErrorEnvelopeMiddleware)
    app.add_middleware(CancelOnDisconnect)
    install_security(app, settings, open_paths=DOCS_PATHS if settings.api_docs else ())
    app.add_middleware(CloseConnectionsWhile, condition=lambda: engine.state is EngineState.DRAINING)
    if on_fatal is not None:
        engine.on_dead = on_fatal  # a dead engine: fail what is in flight, then exit for the supervisor
    app.state.engine = engine
    app.state.context = ctx
    app.include_router(build_router(ctx))
    install_observability(app, engine)
    _install_error_handlers(app)
    install_openapi(app)
    if settings.api_docs:
        install_docs(app, title=app.title)
    return app

