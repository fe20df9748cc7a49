"""Error kinds, the one table that maps them to HTTP statuses, and the OpenAI error envelope."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

__all__ = ["ErrorKind", "ServiceError", "error_body", "status_for"]


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


# kind -> (HTTP status, OpenAI `error.type`). The only place statuses are decided.
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
    ErrorKind.OVERLOADED: (503, "service_unavailable_error"),
    ErrorKind.NOT_READY: (503, "service_unavailable_error"),
    ErrorKind.UNHEALTHY: (503, "service_unavailable_error"),
    ErrorKind.DRAINING: (503, "service_unavailable_error"),
    ErrorKind.TIMEOUT: (504, "timeout_error"),
    ErrorKind.INTERNAL: (500, "server_error"),
}


def status_for(kind: ErrorKind) -> int:
    return _TABLE[kind][0]


class ServiceError(Exception):
    """An error a client should see: a kind (hence a status), a message a person can act on, a param."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return status_for(self.kind)

    def body(self) -> dict[str, Any]:
        return error_body(self.kind, self.message, param=self.param, code=self.code)


def error_body(kind: ErrorKind, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI envelope: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": _TABLE[kind][1], "param": param, "code": code or kind.value}}
