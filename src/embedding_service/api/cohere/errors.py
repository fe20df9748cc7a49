"""Errors in Cohere's shape, `{"id", "message"}`, for the routes Cohere's SDK calls (/v2/embed, /v1/embed,
/v2/rerank): its clients raise them as `BadRequestError`, `NotFoundError` & co. (by status) with the body
attached, whose `message` is what a person reads. What middleware answers before a route runs (401 API key,
429 rate limit, a last-resort 500, 503 while shutting down) keeps the OpenAI envelope.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable
from http import HTTPStatus
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.responses import Response

from ...errors import ServiceError, answered, status_for
from ..openapi import EMBEDDING_ERRORS

__all__ = ["CohereError", "cohere_error_docs", "cohere_error_response", "cohere_errors_of"]

log = logging.getLogger("embedding_service")


class CohereError(BaseModel):
    """Cohere's error body (its SDK raises it as BadRequestError & co., the body attached)."""

    id: str
    message: str


def _embed_message(message: str) -> str:
    """The engine's wording, in Cohere embed's field names (it knows only the OpenAI request's)."""
    message = message.replace('send "truncate": true', 'send "truncate": "END" (or "START")')
    return "texts[" + message[len("input["):] if message.startswith("input[") else message


def cohere_error_response(error: ServiceError, *, embed: bool = True) -> Response:
    """`error` in Cohere's shape; `embed`: the message speaks of `texts` (rerank's already name its fields)."""
    answered(error)
    body = {"id": str(uuid.uuid4()), "message": _embed_message(error.message) if embed else error.message}
    return Response(orjson.dumps(body), status_code=error.status, media_type="application/json",
                    headers=error.http_headers() or None)


async def cohere_errors_of(answer: Awaitable[Response], *, embed: bool = True) -> Response:
    """The route's answer, or its ServiceError in Cohere's shape."""
    try:
        return await answer
    except ServiceError as exc:
        if exc.status >= 500:
            log.warning("request failed: %s", exc.message)
        return cohere_error_response(exc, embed=embed)


_MESSAGES = {413: "request body is 20000000 bytes; the limit is 16777216",
             415: "Content-Type must be application/json, got 'text/plain'",
             503: "the model is still loading; retry shortly", 504: "request did not finish within 120.0s",
             500: "the model failed (RuntimeError); the error is in the server log"}


def cohere_error_docs(bad_request: str) -> dict[int | str, dict[str, Any]]:
    """A route's errors in Cohere's shape for the API reference, one response per status (install_openapi
    adds the OpenAI envelope as an alternative where middleware answers first). `bad_request`: the 400's
    example message."""
    by_status: dict[int, list[str]] = {}
    for kind in EMBEDDING_ERRORS:
        by_status.setdefault(status_for(kind), []).append(kind.value)
    schema = CohereError.model_json_schema()
    messages = {**_MESSAGES, 400: bad_request}
    return {status: {"description": f"{HTTPStatus(status).phrase}: {', '.join(kinds)} (Cohere's error shape)",
                     "content": {"application/json": {"schema": schema, "examples": {kinds[0]: {
                         "summary": kinds[0].replace("_", " "),
                         "value": {"id": "3f1c2a9e-0000-4000-8000-000000000000",
                                   "message": messages.get(status, "see the message")}}}}}}
            for status, kinds in sorted(by_status.items())}
