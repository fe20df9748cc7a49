"""/docs (Swagger UI), /redoc and /openapi.json, served offline.

The Swagger UI and Redoc bundles are the ones the `fastapi-offline` package installs (nothing is fetched
from a CDN, nothing is copied into this repository). The pages load only this server's own files: their
start-up code is a script served here rather than inline, so the Content-Security-Policy can forbid inline
scripts and every other origin. The three paths are public even when API keys are required (the schema is
no secret; the operations still want a key, which Swagger UI's "Authorize" sends); `api_docs=false` removes
them.
"""

from __future__ import annotations

import html
from importlib.resources import files
from pathlib import Path

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS_URL", "CSP", "DOCS_PATHS", "REDOC_CSP", "asset_dir", "install_docs"]

DOCS_PATHS = ("/docs*", "/redoc", "/openapi.json")  # security.is_exempt patterns: open without a key
ASSETS_URL = "/docs/assets"
# Own origin only; no inline script anywhere. Redoc (styled-components) writes <style> elements, so its
# page alone allows inline styles; its search index runs in a blob: worker.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'")
REDOC_CSP = CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'") + "; worker-src 'self' blob:"
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
_REDOC_HEADERS = {**_HEADERS, "Content-Security-Policy": REDOC_CSP}

# Swagger UI's start-up: the schema URL comes from the page (root_path aware); no validator badge (it would
# call validator.swagger.io), and "Authorize" keeps the key only for this page's life.
_SWAGGER_INIT = b"""\
"use strict";
(function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    dom_id: "#swagger-ui",
    validatorUrl: null,
    deepLinking: true,
    displayRequestDuration: true,
    showExtensions: true,
    defaultModelsExpandDepth: 0,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  });
})();
"""


def asset_dir() -> Path:
    """Where fastapi-offline installed swagger-ui-bundle.js, swagger-ui.css and redoc.standalone.js."""
    return Path(str(files("fastapi_offline").joinpath("static")))


def _page(title: str, head: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title>{head}</head><body>{body}</body></html>\n")


def install_docs(app: FastAPI, *, title: str) -> None:
    """Serve /openapi.json (from `app.openapi()`), /docs, /redoc and their assets. Build the app with
    docs_url, redoc_url and openapi_url set to None so that FastAPI's CDN-loading pages are not there."""
    app.mount(ASSETS_URL, StaticFiles(directory=asset_dir()), name="docs-assets")
    openapi_body: list[bytes] = []  # rendered once: the document does not change while the app runs

    def root(request: Request) -> str:
        return html.escape(str(request.scope.get("root_path", "")).rstrip("/"), quote=True)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json() -> Response:
        if not openapi_body:
            openapi_body.append(orjson.dumps(app.openapi()))
        return Response(openapi_body[0], media_type="application/json", headers=_HEADERS)

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> Response:
        base = root(request)
        page = _page(
            f"{title} - API reference",
            f'<link rel="icon" href="{base}{ASSETS_URL}/favicon.png">'
            f'<link rel="stylesheet" href="{base}{ASSETS_URL}/swagger-ui.css">',
            f'<div id="swagger-ui" data-openapi-url="{base}/openapi.json"></div>'
            f'<script src="{base}{ASSETS_URL}/swagger-ui-bundle.js"></script>'
            f'<script src="{base}/docs/swagger-init.js"></script>',
        )
        return Response(page, media_type="text/html", headers=_HEADERS)

    @app.get("/docs/swagger-init.js", include_in_schema=False)
    async def swagger_init() -> Response:
        return Response(_SWAGGER_INIT, media_type="text/javascript", headers=_HEADERS)

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> Response:
        base = root(request)
        page = _page(
            f"{title} - API reference (Redoc)",
            f'<link rel="icon" href="{base}{ASSETS_URL}/favicon.png">',
            f'<redoc spec-url="{base}/openapi.json"></redoc>'
            f'<script src="{base}{ASSETS_URL}/redoc.standalone.js"></script>',
        )
        return Response(page, media_type="text/html", headers=_REDOC_HEADERS)
