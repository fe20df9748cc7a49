"""ASGI middleware for a request's life: drop the work of clients that hang up; close connections in drain.

Neither uvicorn nor Starlette cancels a plain handler when its client disconnects: the handler would
run on, and its texts would still take a place in the batch queue and in the model. `CancelOnDisconnect`
watches the connection once the request body has been read, and cancels the handler when the client
goes; the cancellation reaches the batcher's job future, whose queued texts are then skipped.

Our server's connections (transport.py) offer a `HangupHook` in `scope["extensions"]` and call it back when
the client goes; under any other server a task per request reads the connection instead (that task cost
~17 µs of the event loop per request under load, ~8% of the fake engine's whole request: bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ErrorKind, ServiceError, send_error

__all__ = ["HANGUP_EXTENSION", "CancelOnDisconnect", "CloseConnectionsWhile", "HangupHook"]

log = logging.getLogger("embedding_service")

HANGUP_EXTENSION = "embedding_service.hangup"


class HangupHook:
    """What a server offers as `scope["extensions"][HANGUP_EXTENSION]["hook"]`: it calls `callback` (once
    set) when the client disconnects before the response is complete."""

    __slots__ = ("callback",)

    def __init__(self) -> None:
        self.callback: Callable[[], None] | None = None

    def fire(self) -> None:
        callback, self.callback = self.callback, None
        if callback is not None:
            callback()


class CancelOnDisconnect:
    """Cancel the handler when the client disconnects before its response is complete.

    The handler runs in the server's own task (no extra task, no copy of the context). Once the body is in,
    the server's hang-up hook (or, without one, a watcher task reading the connection) cancels the request's
    task if the client goes.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        request_task = asyncio.current_task()
        assert request_task is not None
        hook: HangupHook | None = (scope.get("extensions") or {}).get(HANGUP_EXTENSION, {}).get("hook")
        watcher: asyncio.Task[None] | None = None
        started = responded = hung_up = False

        def hang_up() -> None:
            nonlocal hung_up
            if not responded:  # (servers also report a disconnect once the response is complete)
                hung_up = True
                request_task.cancel()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            hang_up()

        async def app_receive() -> Message:
            nonlocal watcher
            if watcher is not None:  # the body is in: only the watcher reads the connection now
                await asyncio.shield(watcher)
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                if hook is not None:
                    hook.callback = hang_up
                else:
                    watcher = asyncio.ensure_future(watch())
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started, responded
            started = True
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                responded = True
            await send(message)

        try:
            await self.app(scope, app_receive, tracking_send)
        except asyncio.CancelledError:
            if hung_up and request_task.uncancel() == 0:
                client = scope.get("client") or ("?", 0)
                log.info("client %s disconnected before %s %s finished; its work was dropped",
                         client[0], scope.get("method"), scope.get("path"))
                if not started:
                    # Nobody will read it (servers drop sends after a disconnect), but the metrics and access
                    # middleware outside see the request end as 499 "client closed request", not as a 500.
                    await send_error(send, ServiceError(ErrorKind.CLIENT_CLOSED, "client closed the request"))
                return
            if started or request_task.cancelling() > 1:
                raise
            # The server cancelled the request: its graceful-shutdown time ran out. Say so (503, retry
            # elsewhere) rather than let the server answer a bare 500, then end the task as it asked.
            log.warning("%s %s cancelled: shutdown_timeout ran out before it finished",
                        scope.get("method"), scope.get("path"))
            await send_error(send, ServiceError(ErrorKind.DRAINING, "the server shut down before this request "
                                                "finished; retry it", code="shutting_down",
                                                retry_after_s=1))
            request_task.uncancel()
        finally:
            if hook is not None:
                hook.callback = None
            if watcher is not None:
                watcher.cancel()


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
