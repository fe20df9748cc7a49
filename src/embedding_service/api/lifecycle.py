"""ASGI middleware for a request's life: drop the work of clients that hang up; close connections in drain.

Neither uvicorn nor Starlette cancels a plain handler when its client disconnects: the handler would
run on, and its texts would still take a place in the batch queue and in the model. `CancelOnDisconnect`
watches the connection once the request body has been read, and cancels the handler when the client
goes; the cancellation reaches the batcher's job future, whose queued texts are then skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CancelOnDisconnect", "CloseConnectionsWhile"]

log = logging.getLogger("embedding_service")


class CancelOnDisconnect:
    """Run the app in a task; cancel it when the client disconnects before the response is done."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        disconnected = asyncio.Event()
        body_read = asyncio.Event()

        async def app_receive() -> Message:
            if body_read.is_set():  # only the watcher reads the connection from now on
                await disconnected.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def watch() -> None:
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        handler = asyncio.ensure_future(self.app(scope, app_receive, send))
        watcher = asyncio.ensure_future(watch())
        gone = asyncio.ensure_future(disconnected.wait())
        try:
            await asyncio.wait({handler, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this task itself is cancelled (server shutdown timeout)
            watcher.cancel()
            gone.cancel()
            if not handler.done():
                handler.cancel()
        if not handler.done() or handler.cancelled():
            # The client hung up first: the handler was cancelled, and with it its queued work.
            await asyncio.gather(handler, return_exceptions=True)
            client = scope.get("client") or ("?", 0)
            log.info("client %s disconnected before %s %s finished; its work was dropped",
                     client[0], scope.get("method"), scope.get("path"))
            return
        handler.result()  # re-raise what the app raised


class CloseConnectionsWhile:
    """Add `Connection: close` to responses while `condition()` holds (the server is draining), so that
    clients stop reusing keep-alive connections to a server that is about to close its listener."""

    def __init__(self, app: ASGIApp, condition: Callable[[], bool]) -> None:
        self.app = app
        self.condition = condition

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.condition():
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing_send)
