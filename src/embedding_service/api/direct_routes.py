"""A direct lane for the hot POST routes (embeddings, rerank): straight from our middleware to the handler.

Those handlers take the bare `Request` and validate the body themselves, so FastAPI's per-request
machinery (ExceptionMiddleware, the router's path matching, two AsyncExitStacks, dependency solving) does
nothing for them but cost: ~16% of the event loop's samples at 64 clients on the fake engine (py-spy). Here
a POST to one of those exact paths calls the route's endpoint at once, with the app's own ServiceError
handler; everything else (other methods, other paths, trailing slashes) goes through FastAPI as before.
The matched route is put in the scope, as the router does, so metrics and logs label it the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ServiceError

__all__ = ["DirectRoutes", "direct_routes"]

ErrorHandler = Callable[[Request, ServiceError], Awaitable[Response]]


def direct_routes(routes: Iterable[object]) -> dict[str, APIRoute]:
    """The POST-only routes whose endpoint takes just the request, by path."""
    out: dict[str, APIRoute] = {}
    for route in routes:
        if not isinstance(route, APIRoute) or route.methods != {"POST"} or route.dependencies:
            continue
        params = list(inspect.signature(route.endpoint).parameters.values())
        if "{" not in route.path and len(params) == 1 and params[0].annotation in (Request, "Request"):
            out[route.path] = route
    return out


class DirectRoutes:
    """Pure ASGI: POST to a path in `routes` runs its endpoint directly; any other request goes to `app`."""

    def __init__(self, app: ASGIApp, routes: dict[str, APIRoute], on_service_error: ErrorHandler) -> None:
        self.app = app
        self.routes = routes
        self.on_service_error = on_service_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._match(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route
        scope["endpoint"] = route.endpoint
        request = Request(scope, receive, send)
        try:
            response: Response = await route.endpoint(request)
        except ServiceError as exc:
            response = await self.on_service_error(request, exc)
        await response(scope, receive, send)

    def _match(self, scope: Scope) -> APIRoute | None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return None
        path: str = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # (Starlette's routing matches the path below root_path)
            path = path[len(root):]
        return self.routes.get(path)
