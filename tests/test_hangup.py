"""A client that hangs up has its request's task cancelled: by the server's hang-up hook, or else a watcher.

The end-to-end case (a real server, queued work dropped) is tests/test_resilience_server.py; here the
middleware's two ways of learning of the hang-up, in process.
"""

from __future__ import annotations

import asyncio
from typing import Any

from embedding_service.api.middleware.lifecycle import HANGUP_EXTENSION, HangupHook, RequestLifecycle

BODY = {"type": "http.request", "body": b"{}", "more_body": False}


class Handler:
    """Reads the body, then waits for work that never finishes (or answers at once when `answers`)."""

    def __init__(self, answers: bool = False) -> None:
        self.answers = answers
        self.cancelled = False
        self.body_read = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await receive()
        self.body_read.set()
        if self.answers:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


class Connection:
    """The server side of `receive`: the body, then (on later reads) a disconnect once `gone` is set."""

    def __init__(self) -> None:
        self.reads = 0
        self.gone = asyncio.Event()
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        self.reads += 1
        if self.reads == 1:
            return BODY
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


def scope_with(hook: HangupHook | None) -> dict[str, Any]:
    scope: dict[str, Any] = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": [],
                             "client": ("127.0.0.1", 1)}
    if hook is not None:
        scope["extensions"] = {HANGUP_EXTENSION: {"hook": hook}}
    return scope


async def test_the_servers_hook_cancels_the_request_without_a_task_reading_the_connection() -> None:
    hook, handler, conn = HangupHook(), Handler(), Connection()  # (conn.gone is never set: the hook tells)
    tasks_before = len(asyncio.all_tasks())
    request = asyncio.ensure_future(RequestLifecycle(handler)(scope_with(hook), conn.receive, conn.send))
    await handler.body_read.wait()
    await asyncio.sleep(0.01)
    assert hook.callback is not None and conn.reads == 1  # nobody reads the connection after the body
    assert len(asyncio.all_tasks()) == tasks_before + 1  # the request's task only: no watcher
    hook.fire()  # the connection is lost
    await asyncio.wait_for(request, 2)
    assert handler.cancelled and not request.cancelled()
    assert conn.sent[0]["status"] == 499  # what the metrics and access log outside see
    assert hook.callback is None


async def test_without_a_hook_a_watcher_reads_the_connection_and_cancels() -> None:
    handler, conn = Handler(), Connection()
    request = asyncio.ensure_future(RequestLifecycle(handler)(scope_with(None), conn.receive, conn.send))
    await handler.body_read.wait()
    await asyncio.sleep(0.01)
    assert not request.done() and conn.reads == 2  # the watcher is waiting on the connection
    conn.gone.set()
    await asyncio.wait_for(request, 2)
    assert handler.cancelled and conn.sent[0]["status"] == 499


async def test_a_hang_up_after_the_response_cancels_nothing() -> None:
    hook, handler, conn = HangupHook(), Handler(answers=True), Connection()
    await RequestLifecycle(handler)(scope_with(hook), conn.receive, conn.send)
    hook.fire()  # (the transport fires only unanswered requests' hooks; and the callback is gone anyway)
    assert [m.get("status") for m in conn.sent] == [200, None] and not handler.cancelled
