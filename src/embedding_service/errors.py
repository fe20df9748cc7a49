"""Error kinds, the one table that maps them to HTTP statuses, and the one renderer of the OpenAI envelope.

Every layer raises `ServiceError` with a kind and, when a retry makes sense, `retry_after_s`: nothing below
the API layer names a status or a header. The API layer turns an error into bytes here, either as a
Starlette `Response` (handlers), straight onto an ASGI `send` (middleware that answers before a route runs), or
as raw HTTP/1.1 bytes (the transport, for a connection no app is serving). Each renderer notes the kind it
answered with in the request's `ErrorSlot` (opened by the request middleware), which the metrics count.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from enum import StrEnum
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from starlette.responses import Response
    from starlette.types import Send

__all__ = [
    "ErrorKind",
    "ErrorSlot",
    "ServiceError",
    "answered",
    "error_body",
    "error_response",
    "error_slot",
    "http_error_bytes",
    "kind_for_status",
    "send_error",
    "status_for",
]


class ErrorKind(StrEnum):
    INVALID_REQUEST = "invalid_request"
    AUTHENTICATION = "authentication"
    PERMISSION = "permission"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TIMEOUT = "request_timeout"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    HEADER_TOO_LARGE = "header_too_large"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    NOT_READY = "not_ready"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    # The client hung up first (nginx's 499). Nobody reads the answer; the metrics and logs outside do.
    CLIENT_CLOSED = "client_closed"


# kind -> (HTTP status, OpenAI `error.type`). The only place statuses are decided. Where several kinds
# share a status, the first listed is the one an HTTP status maps back to (kind_for_status).
_TABLE: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorKind.AUTHENTICATION: (401, "authentication_error"),
    ErrorKind.PERMISSION: (403, "permission_error"),
    ErrorKind.NOT_FOUND: (404, "invalid_request_error"),
    ErrorKind.METHOD_NOT_ALLOWED: (405, "invalid_request_error"),
    ErrorKind.REQUEST_TIMEOUT: (408, "invalid_request_error"),
    ErrorKind.PAYLOAD_TOO_LARGE: (413, "invalid_request_error"),
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: (415, "invalid_request_error"),
    ErrorKind.HEADER_TOO_LARGE: (431, "invalid_request_error"),
    ErrorKind.RATE_LIMITED: (429, "rate_limit_error"),
    ErrorKind.CLIENT_CLOSED: (499, "invalid_request_error"),
    ErrorKind.INTERNAL: (500, "server_error"),
    ErrorKind.OVERLOADED: (503, "service_unavailable_error"),
    ErrorKind.NOT_READY: (503, "service_unavailable_error"),
    ErrorKind.UNHEALTHY: (503, "service_unavailable_error"),
    ErrorKind.DRAINING: (503, "service_unavailable_error"),
    ErrorKind.TIMEOUT: (504, "timeout_error"),
}
_BY_STATUS: dict[int, ErrorKind] = {}
for _kind, (_status, _type) in _TABLE.items():
    _BY_STATUS.setdefault(_status, _kind)


def status_for(kind: ErrorKind) -> int:
    return _TABLE[kind][0]


def kind_for_status(status: int) -> ErrorKind:
    """The kind of an HTTP status raised by the framework (404, 405...): the table read backwards."""
    return _BY_STATUS.get(status, ErrorKind.INTERNAL if status >= 500 else ErrorKind.INVALID_REQUEST)


class ServiceError(Exception):
    """An error a client should see: a kind (hence a status), a message a person can act on, a param.

    `retry_after_s`: when the client may retry (overload, loading, draining, rate limits); rendered as the
    Retry-After header. `headers`: other headers, for the API layer only (WWW-Authenticate).
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s
        self.headers = headers or {}
        # Only for a framework error whose status is not in the table (kind_for_status): kept as raised.
        self._status = status

    @property
    def status(self) -> int:
        return self._status if self._status is not None else status_for(self.kind)

    def body(self) -> dict[str, Any]:
        return error_body(self.kind, self.message, param=self.param, code=self.code)

    def http_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers


class ErrorSlot:
    """The kind of the error a request was answered with (None: not answered with one)."""

    __slots__ = ("kind",)

    def __init__(self) -> None:
        self.kind: ErrorKind | None = None


# The current request's slot. Set by the request middleware (outermost), filled by the renderer that answers,
# however deep: handlers and tasks run in copies of its context, which share the slot object.
error_slot: ContextVar[ErrorSlot | None] = ContextVar("error_slot", default=None)


def answered(error: ServiceError) -> ServiceError:
    """Note `error` as the current request's answer (for the errors-by-kind metric); returns it."""
    slot = error_slot.get()
    if slot is not None:
        slot.kind = error.kind
    return error


def error_body(kind: ErrorKind, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI envelope: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": _TABLE[kind][1], "param": param, "code": code or kind.value}}


def error_response(error: ServiceError) -> Response:
    """The error as a Starlette response (exception handlers)."""
    from starlette.responses import Response

    return Response(orjson.dumps(answered(error).body()), status_code=error.status, media_type="application/json",
                    headers=error.http_headers() or None)


async def send_error(send: Send, error: ServiceError) -> None:
    """The error straight onto an ASGI connection (middleware answering before or instead of a route)."""
    body = orjson.dumps(answered(error).body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in error.http_headers().items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def http_error_bytes(error: ServiceError) -> bytes:
    """A complete HTTP/1.1 error response with `Connection: close`, for a connection no app is serving."""
    body = orjson.dumps(error.body())
    try:
        phrase = HTTPStatus(error.status).phrase.encode("latin-1")
    except ValueError:  # 499 and other statuses outside the standard
        phrase = b"Error"
    headers = b"".join(b"%s: %s\r\n" % (name.lower().encode("latin-1"), value.encode("latin-1"))
                       for name, value in error.http_headers().items())
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%sconnection: close\r\n\r\n"
            % (error.status, phrase, len(body), headers)) + body
