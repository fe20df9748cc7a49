"""Pure ASGI middleware: request ids, a total-time header, `Connection: close` while the server drains, and one
observation per request for metrics (with the kind of error it was answered with, if any).

A plain ASGI class rather than Starlette's BaseHTTPMiddleware: that one runs the app in a separate task and
re-streams the body, which costs time on every request and breaks context variables in some versions.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...errors import ErrorSlot, error_slot, kind_for_status
from ...logging_config import request_id_var

__all__ = [
    "REQUEST_ID_HEADER",
    "TOTAL_TIME_HEADER",
    "RequestContextMiddleware",
    "RequestObserver",
    "new_request_id",
    "route_of",
]

REQUEST_ID_HEADER = "X-Request-Id"
TOTAL_TIME_HEADER = "X-Total-Time-Ms"

# (route template, method, status, seconds, error kind) after the response is sent. The error kind is the one the
# error renderer answered with (errors.py), or, when the app failed before answering, its status's (500, 499);
# None for every other answer, a /health 503 included (a state, not an error).
RequestObserver = Callable[[str, str, int, float, str | None], None]

# Client ids are echoed into headers and logs: accept only short, printable, quote-free tokens.
_VALID_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_ID_HEADER_KEY = b"x-request-id"
_REPLACED = (_ID_HEADER_KEY,)  # the app's own copy of our header
_REPLACED_WHEN_CLOSING = (_ID_HEADER_KEY, b"connection")


# Generated ids: a random per-process prefix and a counter. As unique as uuid4 for this purpose, without a
# system call per request.
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def _new_prefix_after_fork() -> None:
    global _ID_PREFIX
    _ID_PREFIX = os.urandom(8).hex()  # a forked worker must not repeat its parent's ids


os.register_at_fork(after_in_child=_new_prefix_after_fork)


def new_request_id() -> str:
    """32 hex characters, unique across processes (random prefix) and within one (counter)."""
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


def route_of(scope: Scope) -> str:
    """The matched route's template (bounded label cardinality: never the raw path), else "unmatched"."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def _client_request_id(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == _ID_HEADER_KEY:
            text = value.decode("latin-1").strip()
            return text if _VALID_ID.fullmatch(text) else None
    return None


class RequestContextMiddleware:
    """Gives every HTTP request an id (the client's X-Request-Id when valid, else a new 32-hex one),
    exposes it to handlers (request header) and logs (context variable), returns it with X-Total-Time-Ms
    on every response, and reports (route, method, status, seconds) to `observer` once it is finished.

    While `closing()` holds (the server is draining) responses say `Connection: close`, so that clients stop
    reusing keep-alive connections to a server that is about to close its listener."""

    def __init__(self, app: ASGIApp, observer: RequestObserver | None = None,
                 closing: Callable[[], bool] | None = None) -> None:
        self.app = app
        self.observer = observer
        self.closing = closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _client_request_id(scope)
        if request_id is None:
            request_id = new_request_id()
            # Handlers read the id from the request headers; replace an invalid one, add a missing one.
            headers = [(k, v) for k, v in scope.get("headers", ()) if k != _ID_HEADER_KEY]
            headers.append((_ID_HEADER_KEY, request_id.encode()))
            scope = {**scope, "headers": headers}
        status = 500  # what the client sees if the app fails before starting a response
        response_started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = int(message["status"])
                elapsed_ms = (time.perf_counter() - started) * 1000
                closing = self.closing is not None and self.closing()
                replaced = _REPLACED_WHEN_CLOSING if closing else _REPLACED
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in replaced]
                if closing:
                    headers.append((b"connection", b"close"))
                headers.append((_ID_HEADER_KEY, request_id.encode()))
                headers.append((b"x-total-time-ms", f"{elapsed_ms:.2f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        token = request_id_var.set(request_id)
        slot = ErrorSlot()
        slot_token = error_slot.set(slot)
        try:
            await self.app(scope, receive, send_with_headers)
        except asyncio.CancelledError:
            if not response_started:
                status = 499  # client went away first (nginx's name for it); not a server error
            raise
        finally:
            request_id_var.reset(token)
            error_slot.reset(slot_token)
            if self.observer is not None:
                kind = slot.kind if slot.kind is not None or response_started else kind_for_status(status)
                self.observer(route_of(scope), scope.get("method", ""), status, time.perf_counter() - started,
                              None if kind is None else kind.value)
