"""The OpenAPI document, generated from the code: pydantic models for bodies, errors.py's table for statuses.

A route states what it takes, answers and raises in one call, `**operation_doc(...)`, e.g.
    @router.post("/v1/rerank", **operation_doc("Rerank documents", body=RerankRequest, response=RerankResponse,
                                               errors=EMBEDDING_ERRORS))
`install_openapi` then adds what the middleware answers on every operation (401 with API keys, 429 with
rate limits, 500 anywhere, 503 on POST while shutting down), the headers every response carries, the bearer
scheme, and drops FastAPI's 422: this server never sends it (bad input is a 400 in the OpenAI envelope).
Statuses and error types come from errors.py; nothing here decides a status.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from ..errors import ErrorKind, error_body, status_for
from .middleware.ratelimit import RateLimitMiddleware
from .middleware.request_context import REQUEST_ID_HEADER, TOTAL_TIME_HEADER
from .middleware.security import ApiKeyMiddleware, is_exempt
from .schemas import ErrorResponse

__all__ = [
    "BEARER_SCHEME",
    "EMBEDDING_ERRORS",
    "error_responses",
    "header",
    "install_openapi",
    "operation_doc",
]

BEARER_SCHEME = "bearerAuth"
_JSON = "application/json"
_REF = "#/components/schemas/{model}"

# What a request that the engine serves can run into: bad input, the body limits, and the engine's states.
EMBEDDING_ERRORS: tuple[ErrorKind, ...] = (
    ErrorKind.INVALID_REQUEST, ErrorKind.PAYLOAD_TOO_LARGE, ErrorKind.UNSUPPORTED_MEDIA_TYPE,
    ErrorKind.NOT_READY, ErrorKind.OVERLOADED, ErrorKind.UNHEALTHY, ErrorKind.DRAINING, ErrorKind.TIMEOUT,
    ErrorKind.INTERNAL,
)

# An example answer per kind, (message, param, code), as the server words it.
_EXAMPLES: dict[ErrorKind, tuple[str, str | None, str | None]] = {
    ErrorKind.INVALID_REQUEST: ("'input' is an empty string", "input", None),
    ErrorKind.AUTHENTICATION: ("missing API key: send the header 'Authorization: Bearer YOUR_KEY'", None,
                               "missing_api_key"),
    ErrorKind.PERMISSION: ("this API key may not use this operation", None, None),
    ErrorKind.NOT_FOUND: ("model 'text-embedding-3-small' is not served here; this server serves "
                          "'Qwen/Qwen3-Embedding-0.6B'", "model", "model_not_found"),
    ErrorKind.METHOD_NOT_ALLOWED: ("method GET is not allowed on /v1/embeddings", None, None),
    ErrorKind.PAYLOAD_TOO_LARGE: ("request body is 20000000 bytes; the limit is 16777216", None,
                                  "payload_too_large"),
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: ("Content-Type must be application/json, got 'text/plain' "
                                       "(curl: add -H 'Content-Type: application/json')", None,
                                       "unsupported_media_type"),
    ErrorKind.RATE_LIMITED: ("rate limit reached: 60 requests per minute for this client; retry after 2s", None,
                             "rate_limit_exceeded"),
    ErrorKind.OVERLOADED: ("server is at capacity (1024 requests, 52000 tokens queued); retry shortly", None,
                           "overloaded"),
    ErrorKind.NOT_READY: ("the model is still loading; retry shortly", None, "model_not_ready"),
    ErrorKind.UNHEALTHY: ("the embedding engine is unavailable", None, "engine_unhealthy"),
    ErrorKind.DRAINING: ("server is shutting down; retry on another instance", None, "shutting_down"),
    ErrorKind.TIMEOUT: ("request did not finish within 120.0s", None, "timeout"),
    ErrorKind.INTERNAL: ("internal server error; see the server log", None, None),
}


def header(description: str, *, required: bool = True, pattern: str | None = None) -> dict[str, Any]:
    """An OpenAPI response header (a string; `pattern` is the shape of its value)."""
    schema: dict[str, Any] = {"type": "string"}
    if pattern:
        schema["pattern"] = pattern
    return {"description": description, "required": required, "schema": schema}


_RETRY_AFTER = header("seconds to wait before retrying", pattern=r"^[0-9]+$")
# Headers an error kind's answers carry ("required": always). At one status, a header is required when every
# kind there always sends it. (Draining: not when the batcher is closed under a queued request.)
_KIND_HEADERS: dict[ErrorKind, dict[str, dict[str, Any]]] = {
    ErrorKind.AUTHENTICATION: {"WWW-Authenticate": header("the Bearer challenge (RFC 6750)", pattern="^Bearer ")},
    ErrorKind.RATE_LIMITED: {"Retry-After": _RETRY_AFTER},
    ErrorKind.OVERLOADED: {"Retry-After": _RETRY_AFTER},
    ErrorKind.NOT_READY: {"Retry-After": _RETRY_AFTER},
    ErrorKind.DRAINING: {"Retry-After": {**_RETRY_AFTER, "required": False}},
}
# On every response (api/middleware/request_context.py).
_COMMON_HEADERS = {
    REQUEST_ID_HEADER: header("this request's id: the client's own when valid, else a new one",
                              pattern=r"^[A-Za-z0-9._:/+=@-]{1,128}$"),
    TOTAL_TIME_HEADER: header("milliseconds the server spent on the request", pattern=r"^[0-9]+\.[0-9]{2}$"),
}


def error_responses(*kinds: ErrorKind) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for these error kinds: one per status, the envelope schema, one example per kind."""
    by_status: dict[int, list[ErrorKind]] = {}
    for kind in dict.fromkeys(kinds):
        by_status.setdefault(status_for(kind), []).append(kind)
    responses: dict[int | str, dict[str, Any]] = {}
    for status, group in sorted(by_status.items()):
        examples = {kind.value: {"summary": kind.value.replace("_", " "), "value": _example(kind)} for kind in group}
        response: dict[str, Any] = {
            "description": f"{HTTPStatus(status).phrase}: " + ", ".join(kind.value for kind in group),
            "content": {_JSON: {"schema": {"$ref": _REF.format(model=ErrorResponse.__name__)},
                                "examples": examples}},
        }
        headers = _group_headers(group)
        if headers:
            response["headers"] = headers
        responses[status] = response
    return responses


def _example(kind: ErrorKind) -> dict[str, Any]:
    message, param, code = _EXAMPLES.get(kind, (kind.value.replace("_", " "), None, None))
    return error_body(kind, message, param=param, code=code)


def _group_headers(group: Sequence[ErrorKind]) -> dict[str, dict[str, Any]]:
    headers: dict[str, dict[str, Any]] = {}
    for kind in group:
        for name, spec in _KIND_HEADERS.get(kind, {}).items():
            headers.setdefault(name, spec)
    return {name: {**spec, "required": all(_KIND_HEADERS.get(kind, {}).get(name, {}).get("required", False)
                                           for kind in group)}
            for name, spec in headers.items()}


_KINDS_KEY = "x-error-kinds"
_BODY_MODELS: dict[str, type[BaseModel]] = {}  # request bodies named by operations, added to the components


def operation_doc(
    summary: str,
    *,
    response: type[BaseModel] | None = None,
    errors: Iterable[ErrorKind] = (),
    body: type[BaseModel] | None = None,
    body_examples: Mapping[str, Any] | None = None,
    headers: Mapping[str, dict[str, Any]] | None = None,
    responses: Mapping[int | str, dict[str, Any]] | None = None,
    tags: Sequence[str] = (),
    media_type: str = _JSON,
) -> dict[str, Any]:
    """Keyword arguments for a FastAPI route: its summary, 200 schema (`response`, or a string body of
    `media_type`), the errors its handler raises, its request body (for handlers that parse it themselves),
    the 200's headers, and other responses (`responses`, e.g. a 503 with its own schema)."""
    ok: dict[str, Any] = {"description": "OK"}
    if response is None:
        ok["content"] = {media_type: {"schema": {"type": "string"}}}
    if headers:
        ok["headers"] = dict(headers)
    # The error kinds travel as an extension that install_openapi turns into responses: FastAPI would drop
    # the examples' null fields (it renders its document with exclude_none).
    extra: dict[str, Any] = {_KINDS_KEY: [kind.value for kind in errors]}
    doc: dict[str, Any] = {"summary": summary, "responses": {200: ok, **(responses or {})}, "openapi_extra": extra}
    if response is not None:
        doc["response_model"] = response
    if tags:
        doc["tags"] = list(tags)
    if body is not None:
        _BODY_MODELS[body.__name__] = body
        content: dict[str, Any] = {"schema": {"$ref": _REF.format(model=body.__name__)}}
        if body_examples:
            content["examples"] = dict(body_examples)
        extra["requestBody"] = {"required": True, "content": {_JSON: content}}
    return doc


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` the whole truth (see the module docstring). What the API-key and rate-limit
    middleware answer is read off the middleware the app really has, with their exempt paths."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        keys_exempt, limit_exempt = _middleware_exemptions(app)
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description=_description(app.description, keys_exempt))
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        models: list[type[BaseModel]] = [ErrorResponse, *_BODY_MODELS.values()]
        for model in models:
            _add_model(schemas, model)
        if keys_exempt is not None:
            components["securitySchemes"] = {BEARER_SCHEME: {
                "type": "http", "scheme": "bearer",
                "description": "an API key of this server (api_keys / api_key_file), sent as "
                               "'Authorization: Bearer KEY'",
            }}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                _complete(operation, method,
                          needs_key=keys_exempt is not None and not is_exempt(path, keys_exempt),
                          rate_limited=limit_exempt is not None and not is_exempt(path, limit_exempt))
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _description(summary: str, keys_exempt: Sequence[str] | None) -> str:
    text = (f"{summary}.\n\nEvery 4xx and 5xx answer has the OpenAI error envelope "
            "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}` (schema `ErrorResponse`), except "
            "the Cohere routes' own errors, in Cohere's `{\"id\", \"message\"}`; each operation lists the "
            "statuses it can answer, with an example of each cause.")
    if keys_exempt is not None:
        open_paths = ", ".join(f"`{path}`" for path in keys_exempt)
        text += ("\n\nThis server requires an API key: `Authorization: Bearer KEY` (press **Authorize**). "
                 f"Open without one: {open_paths}.")
    return text


def _middleware_exemptions(app: FastAPI) -> tuple[Sequence[str] | None, Sequence[str] | None]:
    """The exempt paths of the API-key and of the rate-limit middleware; None where that one is not on."""
    keys: Sequence[str] | None = None
    limits: Sequence[str] | None = None
    for middleware in app.user_middleware:
        exempt: tuple[str, ...] = tuple(middleware.kwargs.get("exempt_paths", ()))  # type: ignore[arg-type]
        if middleware.cls is ApiKeyMiddleware:
            keys = exempt
        elif middleware.cls is RateLimitMiddleware:
            limits = exempt
    return keys, limits


def _complete(operation: dict[str, Any], method: str, *, needs_key: bool, rate_limited: bool) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    responses.pop("422", None)  # FastAPI's validation error: never sent (our handlers answer 400)
    kinds = [ErrorKind(kind) for kind in operation.pop(_KINDS_KEY, [])]  # what the handler raises
    kinds.append(ErrorKind.INTERNAL)  # the error middleware's last resort, on any route
    if method.lower() == "post":
        kinds.append(ErrorKind.DRAINING)  # shutdown_timeout ran out while the request was in flight
    if needs_key:
        kinds.append(ErrorKind.AUTHENTICATION)
        operation["security"] = [{BEARER_SCHEME: []}]
    if rate_limited or needs_key:  # (with keys: too many failed attempts from one address, auth_failures_...)
        kinds.append(ErrorKind.RATE_LIMITED)
    for status, extra in error_responses(*kinds).items():
        _merge_response(responses, str(status), extra)
    for response in responses.values():
        response.setdefault("headers", {}).update(_COMMON_HEADERS)


def _merge_response(responses: dict[str, Any], status: str, extra: dict[str, Any]) -> None:
    """Add an error response; where the status is documented already, add its examples (and, when that
    status has another body, the envelope as an alternative)."""
    current = responses.get(status)
    if current is None:
        responses[status] = extra
        return
    ours = extra["content"][_JSON]
    theirs = current.setdefault("content", {}).setdefault(_JSON, {})
    if theirs.get("schema") not in (None, ours["schema"]):
        theirs["schema"] = {"anyOf": [theirs["schema"], ours["schema"]]}
    theirs.setdefault("schema", ours["schema"])
    new_kinds = [name for name in ours["examples"] if name not in theirs.get("examples", {})]
    theirs.setdefault("examples", {}).update(ours["examples"])
    if new_kinds:
        current["description"] = f"{current.get('description', '')}, {', '.join(new_kinds)}".lstrip(", ")
    # A header stays required only if both the documented answers and the added ones always send it.
    headers, added = current.setdefault("headers", {}), extra.get("headers", {})
    for name in {*headers, *added}:
        spec = headers.get(name) or added[name]
        both = headers.get(name, {}).get("required", False) and added.get(name, {}).get("required", False)
        headers[name] = {**spec, "required": both}


def _add_model(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template=_REF)
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas.setdefault(model.__name__, schema)
