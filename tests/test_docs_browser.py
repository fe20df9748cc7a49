"""The API reference in a real browser: Debian's Chromium, driven by Playwright, offline.

A real server process on loopback; the browser may reach no other host (its resolver maps every name but
127.0.0.1 to nothing, and every non-loopback request goes to a dead proxy), and the test also intercepts
each request and fails on any that would leave loopback unless the page's CSP already refused it.
It loads /docs, finds every operation of /openapi.json rendered, and runs "Try it out" on POST /v1/embeddings
with the documented example: a 200 with a vector. With an API key: a 401 first, then the same 200 after
"Authorize". /redoc renders every operation too. Screenshots go to .ci/artifacts/ (CI keeps them).

CORS (`--cors-allow-origins`): pages served from two other origins (local http servers on other ports) call
/v1/embeddings with fetch(): the allowed one gets vectors with the key (and the 401 without it), the other is
blocked by the browser (fetch throws a TypeError).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from .conftest import ROOT, ServerProcess, missing

pytestmark = pytest.mark.slow

ARTIFACTS = ROOT / ".ci" / "artifacts"
KEY = "docs-test-key-0123456789"
DIMENSION = 64
# The flags that work headless here, and two that keep the browser on loopback.
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",  # loopback bypasses a proxy; anything else meets a closed port
]
# Collects the page's CSP violations, so that a refused resource is told apart from one that was sent.
_CSP_PROBE = ("window.__csp = []; document.addEventListener('securitypolicyviolation', "
              "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")


def _chromium() -> str:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or ""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        executable = ""
    if not executable:
        missing("CI must run the browser test: .ci/run installs Debian's chromium; the test extra has playwright",
                "needs Debian's chromium (apt-get install chromium) and playwright (the test extra)")
    with sync_playwright() as playwright:
        # A fresh profile per launch (Playwright makes a new --user-data-dir); it never downloads a browser.
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


class Page:
    """A new browser context on `server`: records every request, refuses non-loopback ones."""

    def __init__(self, browser: Any, server: ServerProcess) -> None:
        self.server = server
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.context.add_init_script(_CSP_PROBE)
        self.outside: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _route(self, route: Any) -> None:
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1" or url.startswith(("blob:", "data:")):
            route.continue_()
        else:
            self.outside.append(url)
            route.abort("blockedbyclient")

    def goto(self, path: str) -> None:
        self.page.goto(self.server.url + path)

    def csp_violations(self) -> list[str]:
        return list(self.page.evaluate("window.__csp"))

    def check_stayed_home(self, *, refused_by_csp: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """No request left loopback, other than what the page's CSP had already refused to load."""
        assert not self.errors, self.errors
        assert set(self.outside) <= refused_by_csp, self.outside

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name), full_page=False)

    def close(self) -> None:
        self.context.close()


def _operations(server: ServerProcess) -> list[tuple[str, str, str]]:
    document = httpx.get(server.url + "/openapi.json", timeout=10).json()
    return [(method, path, op["operationId"]) for path, ops in document["paths"].items()
            for method, op in ops.items()]


def _assert_all_rendered(page: Page, operations: list[tuple[str, str, str]]) -> None:
    page.page.wait_for_selector(".opblock-summary")
    for method, path, _ in operations:
        summary = page.page.locator(f'.opblock-{method} .opblock-summary-path[data-path="{path}"]')
        assert summary.count() == 1, (method, path)
        assert summary.is_visible(), (method, path)


def _try_embeddings(page: Page, expect_status: int) -> dict[str, Any]:
    """Swagger UI: open POST /v1/embeddings, "Try it out" (first time), "Execute" with the example body."""
    block = page.page.locator("#operations-embeddings-embeddings_v1_embeddings_post")
    if not block.locator(".opblock-body").count():
        block.locator(".opblock-summary").click()
    # The button renders a moment after the block opens: wait for it ("Try it out", or "Cancel" when the
    # block is already in try-out mode) rather than count it at once (that raced, and skipped the click).
    toggle = block.locator("button.try-out__btn")
    toggle.wait_for()
    if toggle.inner_text().strip() == "Try it out":
        toggle.click()
    body = block.locator("textarea.body-param__text")
    assert '"Hello, world!"' in body.input_value()  # the spec's example, as documented
    with page.page.expect_response(lambda r: r.url.endswith("/v1/embeddings") and r.request.method == "POST") as info:
        block.locator("button.execute").click()
    response = info.value
    assert response.status == expect_status, response.text()
    shown = block.locator(".live-responses-table tr.response")  # what the page shows of the answer
    shown.wait_for()
    assert shown.locator(".response-col_status").inner_text().strip() == str(expect_status)
    assert ('"embedding"' if expect_status == 200 else '"error"') in shown.locator(".microlight").first.inner_text()
    block.locator(".responses-inner h4").first.evaluate("e => e.scrollIntoView({block: 'start'})")
    return {"json": response.json(), "request_headers": response.request.all_headers()}


def _check_vector(result: dict[str, Any]) -> None:
    data = result["json"]["data"]
    assert len(data) == 1 and data[0]["index"] == 0
    vector = data[0]["embedding"]
    assert len(vector) == DIMENSION and all(isinstance(x, float) for x in vector)
    assert abs(sum(x * x for x in vector) - 1.0) < 1e-3  # normalised, as the engine returns it


@pytest.fixture(scope="module")
def open_server() -> Iterator[ServerProcess]:
    server = ServerProcess(["--engine", "fake", "--log-level", "WARNING", "--batch-timeout-ms", "0"])
    try:
        server.wait_healthy(60)
        yield server
    finally:
        server.stop()


def test_swagger_ui_renders_every_operation_and_runs_the_example(browser: Any, open_server: ServerProcess) -> None:
    operations = _operations(open_server)
    assert ("post", "/v1/embeddings", "embeddings_v1_embeddings_post") in operations
    page = Page(browser, open_server)
    try:
        page.goto("/docs")
        _assert_all_rendered(page, operations)
        result = _try_embeddings(page, 200)
        _check_vector(result)
        page.screenshot("docs-swagger-ui.png")
        assert page.csp_violations() == []
        page.check_stayed_home()
    finally:
        page.close()


def test_redoc_renders_every_operation(browser: Any, open_server: ServerProcess) -> None:
    operations = _operations(open_server)
    page = Page(browser, open_server)
    try:
        page.goto("/redoc")
        for _, _, operation_id in operations:
            page.page.wait_for_selector(f'[data-section-id="operation/{operation_id}"]', state="attached")
        page.screenshot("docs-redoc.png")
        # Redoc's sidebar always asks cdn.redoc.ly for a logo; the CSP refuses it before any request is sent.
        violations = page.csp_violations()
        refused = {entry.split(" ", 1)[1] for entry in violations}
        assert all(entry.startswith("img-src ") for entry in violations), violations
        page.check_stayed_home(refused_by_csp=refused)
    finally:
        page.close()


def test_authorize_then_try_it_out_with_an_api_key(browser: Any) -> None:
    server = ServerProcess(["--engine", "fake", "--log-level", "WARNING", "--batch-timeout-ms", "0"],
                           env={"EMBEDDING_API_KEYS": KEY})
    page = None
    try:
        server.wait_healthy(60)
        assert httpx.get(server.url + "/v1/models", timeout=5).status_code == 401  # the key is required...
        page = Page(browser, server)
        page.goto("/docs")  # ...but the reference is open
        _assert_all_rendered(page, _operations(server))
        refused = _try_embeddings(page, 401)  # before "Authorize": the server wants the key
        assert refused["json"]["error"]["code"] == "missing_api_key"

        page.page.locator(".auth-wrapper button.authorize").click()
        dialog = page.page.locator(".modal-ux")
        dialog.locator("input").first.fill(KEY)
        dialog.locator("button.authorize").click()
        dialog.locator("button.btn-done").click()
        result = _try_embeddings(page, 200)
        assert result["request_headers"]["authorization"] == f"Bearer {KEY}"
        _check_vector(result)
        page.screenshot("docs-swagger-ui-authorized.png")
        assert page.csp_violations() == []
        page.check_stayed_home()
    finally:
        if page is not None:
            page.close()
        server.stop()


class _PageHandler(BaseHTTPRequestHandler):
    """Serves one empty page: what a web app on another origin would be, before it calls the API."""

    def do_GET(self) -> None:  # (http.server calls it by this name)
        body = b"<!doctype html><html><head><title>cors</title></head><body>another origin</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:  # (quiet)
        pass


@pytest.fixture(scope="module")
def page_origins() -> Iterator[tuple[str, str]]:
    """Two page servers on loopback, two origins: (allowed, not allowed)."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield tuple(f"http://127.0.0.1:{server.server_address[1]}" for server in servers)  # type: ignore[return-value]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


_FETCH = """async ([url, key]) => {
  const headers = {"Content-Type": "application/json"};
  if (key) headers["Authorization"] = "Bearer " + key;
  try {
    const r = await fetch(url + "/v1/embeddings", {method: "POST", headers,
                                                   body: JSON.stringify({input: "hello from another origin"})});
    return {status: r.status, body: await r.json(), requestId: r.headers.get("X-Request-ID")};
  } catch (e) {
    return {error: e.name + ": " + e.message};
  }
}"""


def test_cors_a_page_on_an_allowed_origin_gets_vectors_another_is_blocked(browser: Any,
                                                                        page_origins: tuple[str, str]) -> None:
    allowed, other = page_origins
    server = ServerProcess(["--engine", "fake", "--log-level", "WARNING", "--batch-timeout-ms", "0",
                            "--cors-allow-origins", allowed], env={"EMBEDDING_API_KEYS": KEY})
    pages: list[Page] = []
    try:
        server.wait_healthy(60)
        results = {}
        for origin in (allowed, other):
            page = Page(browser, server)
            pages.append(page)
            page.page.goto(origin + "/")
            results[origin] = (page.page.evaluate(_FETCH, [server.url, KEY]),
                               page.page.evaluate(_FETCH, [server.url, ""]))
            page.check_stayed_home()
        (with_key, without_key), (blocked, blocked_without_key) = results[allowed], results[other]
        assert with_key.get("status") == 200, with_key
        _check_vector({"json": with_key["body"]})
        assert with_key["requestId"]  # an exposed response header the page may read
        # The preflight passes without a key, the request itself still needs one (its 401 readable).
        assert without_key.get("status") == 401 and without_key["body"]["error"]["code"] == "missing_api_key"
        for refused in (blocked, blocked_without_key):  # the browser blocks the call: fetch throws
            assert refused.get("error", "").startswith("TypeError"), refused
    finally:
        for page in pages:
            page.close()
        server.stop()
