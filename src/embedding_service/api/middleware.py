"""ASGI middleware: unexpected exceptions become one logged line and a 500 in the OpenAI envelope."""

from __future__ import annotations

import logging

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ErrorKind, ServiceError, send_error

__all__ = ["ErrorEnvelopeMiddleware"]

log = logging.getLogger("embedding_service")


class ErrorEnvelopeMiddleware:
    """Catches what no handler did: the client gets a 500 envelope (never a traceback), the log gets it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            # The client went away while sending its body (or its body deadline passed): not a server error.
            timed_out = bool((scope.get("state") or {}).get("read_timeout"))
            client = scope.get("client") or ("?", 0)
            log.info("client %s %s while sending the body of %s %s", client[0],
                     "was too slow" if timed_out else "disconnected", scope.get("method"), scope.get("path"))
            if not started:  # nobody reads it; metrics and the access log outside see 408/499, not 500
                await send_error(send, ServiceError(ErrorKind.REQUEST_TIMEOUT, "the request body came too slowly")
                                 if timed_out else ServiceError(ErrorKind.CLIENT_CLOSED, "client closed the request"))
        except Exception as exc:
            log.error("internal error on %s %s: %s: %s", scope.get("method"), scope.get("path"),
                      type(exc).__name__, exc, exc_info=exc)
            if started:
                return  # headers already sent: nothing sane left to say to this client
            await send_error(send, ServiceError(ErrorKind.INTERNAL, "internal server error; see the server log"))
