"""The ASGI application over one engine: middleware, routes, error handlers, and the engine's lifecycle."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..batch import mount_batch_api
from ..config import EmbeddingConfig
from ..engine.core import EngineCore
from ..engine.loading import ModelLoad, ModelLoadError, load_models
from ..engine.rerank import RerankEngine
from ..engine.types import EngineState
from ..errors import ErrorKind, ServiceError, error_response, kind_for_status
from .body import read_json_body
from .cohere.routes import build_cohere_router
from .context import RouteOptions, ServiceContext
from .direct_routes import DirectRoutes, direct_routes
from .docs import DOCS_PATHS, install_docs
from .embed.routes import build_embed_router
from .embed.tiktoken_ids import TiktokenDecoder
from .middleware.cors import install_cors
from .middleware.lifecycle import RequestLifecycle
from .middleware.observability import install_observability
from .middleware.ratelimit import RateLimiter, RateLimitMiddleware
from .middleware.security import ApiKeyMiddleware, ApiKeyVerifier, GuardOptions, load_key_digests
from .multivector.routes import build_multivector_router
from .openapi import install_openapi
from .rerank.routes import build_rerank_router
from .served import EMBED, RERANK, Served, ServedModels
from .service_routes import build_service_router
from .sparse.routes import build_sparse_router
from .tokenize.routes import build_tokenize_router

__all__ = ["create_app"]

log = logging.getLogger("embedding_service")


async def _service_error(_request: Request, exc: ServiceError) -> Response:
    if exc.status >= 500:
        log.warning("request failed: %s", exc.message)
    return error_response(exc)


def _install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)  # type: ignore[arg-type]

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        param = ".".join(loc) or None
        return error_response(ServiceError(ErrorKind.INVALID_REQUEST,
                                           f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(ServiceError(kind_for_status(exc.status_code), message,
                                           headers=dict(exc.headers or {}), status=exc.status_code))


def _install_guards(app: FastAPI, options: GuardOptions, *, open_paths: Sequence[str] = ()) -> None:
    """Add the rate-limit (inner) and API-key (outer) middleware that the options ask for. `open_paths`
    (the API reference) are exempt as well as `auth_exempt_paths`."""
    exempt = list(dict.fromkeys([*options.exempt_paths, *open_paths]))
    if options.rate_limit_rpm or options.rate_limit_tpm:
        limiter = RateLimiter(options.rate_limit_rpm, options.rate_limit_tpm)
        app.add_middleware(RateLimitMiddleware, limiter=limiter, exempt_paths=exempt)
    digests = load_key_digests(options.api_keys, options.api_key_file)
    if digests:
        failures = RateLimiter(options.auth_failures_per_minute, 0) if options.auth_failures_per_minute else None
        app.add_middleware(ApiKeyMiddleware, verifier=ApiKeyVerifier(digests), exempt_paths=exempt, failures=failures)
        log.info("API keys required (%d configured); open paths: %s", len(digests), ", ".join(exempt) or "none")


def create_app(
    settings: EmbeddingConfig,
    engine: EngineCore | None = None,
    *,
    reranker: RerankEngine | None = None,
    models: Sequence[Served] | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
    on_loaded: Callable[[], None] | None = None,
    load_before_serving: bool = False,
) -> FastAPI:
    """The HTTP application over the served models (built by service.py; tests pass fake ones): `models`,
    each with its name, engine and task, or the embedding engine and/or the reranker's under the names the
    settings give them. The app's lifespan starts the engines in the background (engine/loading.py: together
    where they may), then calls `on_loaded` (`on_fatal` gets the first failure, naming its model), and drains
    and stops them at shutdown; with `load_before_serving` it starts them before the server accepts its first
    connection.

    Raises RuntimeError / ValueError for a setting it cannot honour (token_ids_tiktoken offline, a
    malformed API key file).
    """
    if models is None:
        models = [*([Served(settings.public_model_name, engine, EMBED)] if engine is not None else []),
                  *([Served(settings.public_rerank_model_name or "reranker", reranker, RERANK)] if reranker else [])]
    served = ServedModels(models)
    engines = [m.engine for m in served.all]
    decoder = TiktokenDecoder(settings.token_ids_tiktoken) if settings.token_ids_tiktoken else None
    ctx = ServiceContext(served, RouteOptions.from_config(settings), decoder)

    async def load() -> None:
        try:
            await load_models([ModelLoad(m.name, m.task, m.engine, m.loads_alone) for m in served.all])
        except ModelLoadError as exc:
            if on_fatal is not None:
                on_fatal(exc)
            return
        if on_loaded is not None:
            on_loaded()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.get_running_loop().create_task(load(), name="model-load")
        if load_before_serving:
            await asyncio.shield(loader)
        try:
            yield
        finally:
            if not loader.done():
                loader.cancel()
            await asyncio.gather(*(each.drain(settings.shutdown_timeout) for each in engines))
            for each in engines:
                await each.stop()

    # FastAPI's own /docs and /redoc load their scripts from a CDN: ours (api/docs.py) are served offline.
    app = FastAPI(title="Embedding Service", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible text embeddings", docs_url=None, redoc_url=None, openapi_url=None)
    # Innermost: the hot POST routes skip FastAPI's routing layers (api/direct_routes.py). Filled below, once
    # the routes exist; the middleware stack itself is only built at startup.
    direct: dict[str, APIRoute] = {}
    app.add_middleware(DirectRoutes, routes=direct, on_service_error=_service_error)
    app.add_middleware(RequestLifecycle)
    _install_guards(app, GuardOptions.from_config(settings), open_paths=DOCS_PATHS if settings.api_docs else ())
    if on_fatal is not None:
        for each in engines:
            each.on_dead = on_fatal  # a dead engine: fail what is in flight, then exit for the supervisor
    app.state.engine = served.primary.engine
    app.state.engines = engines
    app.state.context = ctx
    app.include_router(build_service_router(ctx))
    app.include_router(build_embed_router(ctx))
    app.include_router(build_rerank_router(served, lambda request: read_json_body(request, settings.max_body_bytes)))
    mount_batch_api(app, settings)  # /v1/files, /v1/batches (docs/batch.md); off without data_dir

    async def read_body(request: Request) -> bytes | bytearray:  # the embeddings routes' content-type and size checks
        return await read_json_body(request, settings.max_body_bytes)

    app.include_router(build_sparse_router(served, read_body))
    app.include_router(build_multivector_router(served, read_body))

    strict = settings.input_type_strict
    app.include_router(build_cohere_router(served, read_body, input_type_strict=strict))
    app.include_router(build_tokenize_router(served, read_body, input_type_strict=strict))
    shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR") if settings.api_processes > 1 else None
    install_observability(  # rerankers' metrics are embedding_rerank_*, each labelled by model
        app, served.all, closing=lambda: any(each.state is EngineState.DRAINING for each in engines),
        multiprocess_dir=shared)
    _install_error_handlers(app)
    direct.update(direct_routes(app.routes))
    install_openapi(app)
    if settings.api_docs:
        install_docs(app, title=app.title)
    install_cors(app, settings.cors_allow_origins)  # last: outermost, a preflight never meets the key check
    return app
