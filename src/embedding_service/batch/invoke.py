"""Run one batch line through the app's own endpoint, in process: the answer is byte for byte what a client
posting that body would get (the same parsing, limits, model choice, encoding and error envelope).

The call enters the app below the API-key and rate-limit middleware (the batch was authorised when it was
made; its owner is put in the scope as that middleware would) at the request-lifecycle layer, which turns
anything a handler raises into the OpenAI envelope. It runs at background priority (engine/priority.py): the
engines serve it only when online requests leave them idle.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message

from ..api.middleware.lifecycle import RequestLifecycle
from ..api.middleware.security import CLIENT_ID_KEY
from ..engine.priority import background
from ..errors import error_slot
from .objects import RETRY_STATUSES, Answer

__all__ = ["RETRY_STATUSES", "Answer", "Invoker"]


class Invoker:
    def __init__(self, app: Any) -> None:
        self._app = app  # the FastAPI app (its middleware stack is built at its first event)

    def _inner(self) -> ASGIApp:
        layer = getattr(self._app, "middleware_stack", None)
        while layer is not None and not isinstance(layer, RequestLifecycle):
            layer = getattr(layer, "app", None)
        if layer is None:
            raise RuntimeError("the app has no RequestLifecycle layer (or has not started)")
        return layer

    async def post(self, path: str, body: bytes, *, owner: str, request_id: str) -> Answer:
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"x-request-id", request_id.encode())],
            "client": ("batch", 0), "server": ("batch", 0), "state": {}, "extensions": {},
            "app": self._app, CLIENT_ID_KEY: owner or None,
        }
        sent = False
        parked = asyncio.Event()  # never set: after the body, the request just waits (no hang-up ever comes)

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await parked.wait()
            return {"type": "http.disconnect"}

        status = 500
        content_type = ""
        chunks: list[bytes] = []

        async def send(message: Message) -> None:
            nonlocal status, content_type
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = dict(message.get("headers") or ())
                content_type = headers.get(b"content-type", b"").decode("latin-1")
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        # A line's error is its outcome (embedding_batch_lines_total), never that of an HTTP request whose
        # context this task may have been started in.
        slot = error_slot.set(None)
        try:
            with background():
                await self._inner()(scope, receive, send)
        finally:
            error_slot.reset(slot)
        return Answer(status, b"".join(chunks), content_type)
