"""ASGI middleware for how a request ends when its handler does not simply answer: one layer, one place.

- **The client hangs up** once its body is in. Neither uvicorn nor Starlette cancels a plain handler then:
  it would run on, and its texts would still take a place in the batch queue and in the model. Here the
  request's task is cancelled; the cancellation reaches the batcher's job future, whose queued texts are
  skipped. Our server's connections (transport.py) offer a `HangupHook` in `scope["extensions"]` and call it
  back when the client goes; under any other server a task per request reads the connection instead (that
  task cost ~17 µs of the event loop per request under load: bench/RESULTS.md).
- **The body stops coming** (the client went, or its body deadline passed): 499 / 408, not a server error.
- **The shutdown deadline** cancels the request: 503 `shutting_down` (retry elsewhere), not a bare 500.
- **Anything the handler raises**: one logged line and a 500 in the OpenAI envelope, never a traceback.

Statuses no client reads (it is gone) are still sent, for the metrics and access log outside to count.
This was three layers (a send wrapper each, on every response); one costs the event loop less per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...engine.priority import in_background
from ...errors import ErrorKind, ServiceError, send_error

__all__ = ["HANGUP_EXTENSION", "HangupHook", "RequestLifecycle"]

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


class RequestLifecycle:
    """See the module doc. The handler runs in the server's own task (no extra task, no copy of the context);
    hang-ups are watched on POST requests only (the others are short and do no batched work)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_task = asyncio.current_task()
        assert request_task is not None
        is_post = scope.get("method") == "POST"
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
            await self.app(scope, app_receive if is_post else receive, tracking_send)
        except asyncio.CancelledError:
            if not (is_post and await self._answer_cancelled(scope, send, request_task, hung_up, started)):
                raise
        except ClientDisconnect:
            # The client went away while sending its body (or its body deadline passed): not a server error.
            timed_out = bool((scope.get("state") or {}).get("read_timeout"))
            client = scope.get("client") or ("?", 0)
            log.info("client %s %s while sending the body of %s %s", client[0],
                     "was too slow" if timed_out else "disconnected", scope.get("method"), scope.get("path"))
            if not started:
                await send_error(send, ServiceError(ErrorKind.REQUEST_TIMEOUT, "the request body came too slowly")
                                 if timed_out else ServiceError(ErrorKind.CLIENT_CLOSED, "client closed the request"))
        except Exception as exc:
            log.error("internal error on %s %s: %s: %s", scope.get("method"), scope.get("path"),
                      type(exc).__name__, exc, exc_info=exc)
            if not started:  # (headers already sent: nothing sane left to say to this client)
                await send_error(send, ServiceError(ErrorKind.INTERNAL, "internal server error; see the server log"))
        finally:
            if hook is not None:
                hook.callback = None
            if watcher is not None:
                watcher.cancel()

    @staticmethod
    async def _answer_cancelled(scope: Scope, send: Send, request_task: asyncio.Task[None], hung_up: bool,
                                started: bool) -> bool:
        """A POST's task was cancelled: by a hang-up (499), or by the server (503 when its shutdown deadline
        ran out). False: not ours to answer, the cancellation goes on."""
        if hung_up and request_task.uncancel() == 0:
            client = scope.get("client") or ("?", 0)
            log.info("client %s disconnected before %s %s finished; its work was dropped",
                     client[0], scope.get("method"), scope.get("path"))
            if not started:
                await send_error(send, ServiceError(ErrorKind.CLIENT_CLOSED, "client closed the request"))
            return True
        if started or request_task.cancelling() > 1 or in_background():
            return False  # (in background: a Batch API line whose batch stopped; its runner drops it)
        # The server cancelled the request: its graceful-shutdown time ran out. Say so (503, retry
        # elsewhere) rather than let the server answer a bare 500, then end the task as it asked.
        log.warning("%s %s cancelled: shutdown_timeout ran out before it finished",
                    scope.get("method"), scope.get("path"))
        await send_error(send, ServiceError(ErrorKind.DRAINING, "the server shut down before this request "
                                            "finished; retry it", code="shutting_down", retry_after_s=1))
        request_task.uncancel()
        return True
