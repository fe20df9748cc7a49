"""CORS for browser pages on other origins (off unless `cors_allow_origins` is set): Starlette's middleware,
outermost, so that a preflight (OPTIONS) is answered before the API-key check (browsers send preflights
without credentials) while the request itself still needs its key.

No credentials mode: the API key travels in the Authorization header, which a page sends with
`credentials: "omit"` once the preflight allows the header; so `*` is safe to allow (no cookies are involved).
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from .request_context import REQUEST_ID_HEADER, TOTAL_TIME_HEADER

__all__ = ["install_cors"]

_METHODS = ["GET", "POST", "HEAD"]
_REQUEST_HEADERS = ["Authorization", "Content-Type", REQUEST_ID_HEADER]
_RESPONSE_HEADERS = [REQUEST_ID_HEADER, TOTAL_TIME_HEADER, "X-Queue-Time-Ms", "X-Inference-Time-Ms", "Retry-After"]


def install_cors(app: FastAPI, origins: list[str]) -> None:
    """Add the CORS middleware for `origins` (call it after every other middleware: it must be outermost)."""
    if not origins:
        return
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=_METHODS,
                       allow_headers=_REQUEST_HEADERS, expose_headers=_RESPONSE_HEADERS, allow_credentials=False,
                       max_age=600)
