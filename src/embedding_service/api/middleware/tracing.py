"""The HTTP request's server span (tracing.py): continues the caller's W3C `traceparent`, is current while the
app runs (the engine's spans are its children), and is named by the matched route once routing is done.

Installed only when tracing is on: a server without an OTLP endpoint has no such layer at all.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ... import tracing
from .request_context import route_of

__all__ = ["TracingMiddleware"]

_PROPAGATED = (b"traceparent", b"tracestate")
_UNTRACED = frozenset({"/health", "/health/live", "/health/ready", "/metrics"})  # probes and scrapes: noise


class TracingMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.app = app
        self._w3c = TraceContextTextMapPropagator()  # W3C only, whatever the process's global propagator is

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracer = tracing.TRACER
        if scope["type"] != "http" or tracer is None or scope.get("path") in _UNTRACED:
            await self.app(scope, receive, send)
            return
        from opentelemetry.trace import SpanKind, Status, StatusCode

        carrier = {key.decode("latin-1"): value.decode("latin-1")
                   for key, value in scope.get("headers", ()) if key in _PROPAGATED}
        method = scope.get("method", "")
        attributes: dict[str, Any] = {"http.request.method": method, "url.path": scope.get("path", "")}
        for key, value in scope.get("headers", ()):
            if key == b"x-request-id":  # (the request context middleware, outside, made sure there is one)
                attributes["embedding.request_id"] = value.decode("latin-1")
        status = 500  # what the client sees if the app fails before starting a response
        started = False

        async def send_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
            await send(message)

        with tracer.start_as_current_span(method, context=self._w3c.extract(carrier), kind=SpanKind.SERVER,
                                          attributes=attributes) as span:
            try:
                await self.app(scope, receive, send_status)
            except asyncio.CancelledError:
                if not started:
                    status = 499  # the client went first, as the metrics count it
                raise
            finally:
                route = route_of(scope)
                span.update_name(f"{method} {route}")
                span.set_attributes({"http.route": route, "http.response.status_code": status})
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
