"""OpenTelemetry tracing (docs/ops.md, "Tracing"), checked end to end: a real server exports to a real OTLP/HTTP
receiver started here (it decodes the protobuf bodies with opentelemetry-proto), and the span tree of real
requests is read back. Also: off by default and then absent (no middleware, opentelemetry never imported), a
clear refusal when the extra is missing, and a collector that is down costs nothing but its spans.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import ServerProcess, free_port

if os.environ.get("CI"):  # CI installs the tracing extra (scripts/install.sh --test): the test must run there
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
else:
    trace_service_pb2 = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

pytestmark = pytest.mark.slow

SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER


class Receiver:
    """A collector's OTLP/HTTP traces endpoint on 127.0.0.1: every span it is sent, decoded."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.resources: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                with receiver.lock:
                    for resource_spans in request.resource_spans:
                        receiver.resources.append(_attrs(resource_spans.resource.attributes))
                        for scope_spans in resource_spans.scope_spans:
                            receiver.spans.extend(scope_spans.spans)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, done: Any, timeout: float = 20.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                spans = list(self.spans)
            if done(spans):
                return spans
            time.sleep(0.1)
        raise AssertionError(f"the spans expected never arrived; got {[s.name for s in spans]}")


def _attrs(attributes: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None
    return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    each = Receiver()
    yield each
    each.server.shutdown()


def _traceparent(n: int) -> tuple[str, str, str]:
    trace_id, parent = f"{0xABC0000 + n:032x}", f"{0x1234000 + n:016x}"
    return f"00-{trace_id}-{parent}-01", trace_id, parent


def test_span_tree_of_real_requests(server_factory: type[ServerProcess], receiver: Receiver) -> None:
    # 400 ms a batch: the requests sent while the first runs wait and go out together in the next batch.
    server = server_factory(["--engine", "fake", "--fake-delay-ms", "400", "--otlp-endpoint", receiver.url,
                             "--otlp-service-name", "embed-test"], env={"OTEL_BSP_SCHEDULE_DELAY": "100"})
    server.wait_healthy(60)
    callers = {n: _traceparent(n) for n in range(5)}

    def call(n: int) -> httpx.Response:
        if n:
            time.sleep(0.05)  # the first is in its batch by then
        return httpx.post(server.url + "/v1/embeddings", json={"input": [f"text {n}", "more"]}, timeout=30,
                          headers={"traceparent": callers[n][0], "X-Request-Id": f"req-{n}"})

    # A caller whose trace is not sampled (flags 00): none of its request's spans may be exported.
    unsampled = f"{0xDEAD:032x}"
    answer = httpx.post(server.url + "/v1/embeddings", json={"input": "not traced"}, timeout=30,
                        headers={"traceparent": f"00-{unsampled}-{0xBEEF:016x}-00"})
    assert answer.status_code == 200
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(call, callers))
    assert [a.status_code for a in answers] == [200] * 5
    model = answers[0].json()["model"]

    def complete(spans: list[Any]) -> bool:
        servers = [s for s in spans if s.kind == SERVER_KIND and s.trace_id.hex() in {c[1] for c in callers.values()}]
        return len(servers) == 5 and sum(s.name == "batch" for s in spans) >= 2
    spans = receiver.wait_for(complete)
    assert not [s.name for s in spans if s.trace_id.hex() == unsampled]  # (exported in order: it came first)
    by_id = {s.span_id: s for s in spans}
    children: dict[bytes, list[Any]] = {}
    for s in spans:
        children.setdefault(s.parent_span_id, []).append(s)
    assert {"service.name": "embed-test"}.items() <= receiver.resources[0].items()

    request_spans = {}
    for n, (_, trace_id, parent) in callers.items():
        # The server span continues the caller's trace, under the caller's span.
        [server_span] = [s for s in spans if s.kind == SERVER_KIND and s.trace_id.hex() == trace_id]
        assert server_span.parent_span_id.hex() == parent
        assert server_span.name == "POST /v1/embeddings"
        attrs = _attrs(server_span.attributes)
        assert attrs["http.route"] == "/v1/embeddings" and attrs["http.response.status_code"] == 200
        assert attrs["embedding.model"] == model and attrs["embedding.texts"] == 2
        assert attrs["embedding.request_id"] == f"req-{n}"
        kids = {s.name: s for s in children.get(server_span.span_id, [])}
        assert {"tokenize", "queue", "serialize"} <= kids.keys(), kids.keys()
        for kid in kids.values():
            assert kid.trace_id == server_span.trace_id
            assert server_span.start_time_unix_nano <= kid.start_time_unix_nano <= kid.end_time_unix_nano \
                <= server_span.end_time_unix_nano
        tokenize = _attrs(kids["tokenize"].attributes)
        assert tokenize["embedding.texts"] == 2 and tokenize["embedding.tokens"] > 2
        assert kids["queue"].end_time_unix_nano >= kids["tokenize"].end_time_unix_nano
        request_spans[server_span.span_id] = n

    batches = [s for s in spans if s.name == "batch"]
    linked: dict[bytes, Any] = {}
    for batch in batches:
        links = {link.span_id for link in batch.links}
        assert links <= request_spans.keys()
        # In the trace of a request it carried (its parent), linked to every one of them.
        assert batch.parent_span_id in links and batch.trace_id == by_id[batch.parent_span_id].trace_id
        attrs = _attrs(batch.attributes)
        assert attrs["embedding.batch.requests"] == len(links)
        assert attrs["embedding.batch.size"] == 2 * len(links) and attrs["embedding.batch.tokens"] > 0
        [forward] = [s for s in children.get(batch.span_id, []) if s.name == "forward"]
        assert batch.start_time_unix_nano <= forward.start_time_unix_nano
        assert forward.end_time_unix_nano - forward.start_time_unix_nano >= 390_000_000  # the fake's 400 ms
        linked.update(dict.fromkeys(links, batch))
    assert linked.keys() == request_spans.keys()  # every request's batch links back to it
    assert max(len(b.links) for b in batches) >= 3, [len(b.links) for b in batches]


def test_off_by_default_means_no_tracing_code_at_all() -> None:
    """Without an endpoint the app has no tracing layer and opentelemetry is never even imported."""
    script = (
        "import sys\n"
        "from embedding_service.api.app import create_app\n"
        "from embedding_service.api.middleware.tracing import TracingMiddleware\n"
        "from embedding_service.config import EmbeddingConfig\n"
        "from embedding_service.service import build_engines, plan_service\n"
        "settings = EmbeddingConfig(engine='fake')\n"
        "engines = build_engines(plan_service(settings))\n"
        "app = create_app(settings, next(iter(engines.values())))\n"
        "assert not [m for m in app.user_middleware if m.cls is TracingMiddleware], app.user_middleware\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
        "print('ok')\n")
    # (TracingMiddleware's module imports opentelemetry only when a middleware is made.)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _without_opentelemetry(tmp_path: Path) -> dict[str, str]:
    """An environment where `import opentelemetry` fails, as without the tracing extra."""
    blocker = tmp_path / "block" / "opentelemetry"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('opentelemetry is not installed (test)')\n")
    return {"PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}


def test_missing_extra_refuses_with_one_line_and_serves_without_endpoint(
        server_factory: type[ServerProcess], tmp_path: Path) -> None:
    blocked = _without_opentelemetry(tmp_path)
    env = {**os.environ, **blocked}
    refused = subprocess.run([sys.executable, "-m", "embedding_service", "serve", "--engine", "fake",
                              "--host", "127.0.0.1", "--port", str(free_port()), "--otlp-endpoint",
                              "http://127.0.0.1:4318"], capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert lines[-1] == ("embedding-service: --otlp-endpoint needs the tracing extra: pip install "
                         "'embedding-service[tracing]' (opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http)")
    assert "Traceback" not in refused.stderr
    server = server_factory(["--engine", "fake"], env=blocked)
    server.wait_healthy(60)
    answer = httpx.post(server.url + "/v1/embeddings", json={"input": "hello"}, timeout=30)
    assert answer.status_code == 200 and len(answer.json()["data"]) == 1


def test_collector_down_costs_only_the_spans(server_factory: type[ServerProcess]) -> None:
    """Spans for a collector nobody listens on: requests are served as usual and SIGTERM exits promptly
    (the exporter's retries happen on its own thread; the exit flush is bounded)."""
    dead = f"http://127.0.0.1:{free_port()}"
    server = server_factory(["--engine", "fake", "--otlp-endpoint", dead, "--shutdown-timeout", "2"],
                            env={"OTEL_BSP_SCHEDULE_DELAY": "50"})
    server.wait_healthy(60)
    with httpx.Client(timeout=10) as client:
        for n in range(200):
            answer = client.post(server.url + "/v1/embeddings", json={"input": [f"t{n}"] * 4})
            assert answer.status_code == 200
            assert float(answer.headers["x-total-time-ms"]) < 1000
    time.sleep(0.5)  # exports are failing now
    started = time.monotonic()
    assert server.stop(timeout=20) == 0, server.log()
    assert time.monotonic() - started < 2 + 2 + 3, server.log()  # drain + the bounded flush + slack


@pytest.fixture
def in_memory_tracing() -> Iterator[Any]:
    """Tracing on in this process, into memory (what configure() sets up, with the exporter swapped)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from embedding_service import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.TRACER = provider.get_tracer("test")
    try:
        yield exporter
    finally:
        tracing.TRACER = None


async def test_a_failed_batch_is_an_error_in_its_spans(in_memory_tracing: Any) -> None:
    from opentelemetry.trace import StatusCode

    from embedding_service.backends.fake.embed import FakeBackend

    from .conftest import fake_app

    async with fake_app(backend=FakeBackend(dimension=64, max_model_len=64, fail_batches=[0])) as app:
        failed = await app.http.post("/v1/embeddings", json={"input": ["a", "b"]})
        ok = await app.http.post("/v1/embeddings", json={"input": "c"})
    assert (failed.status_code, ok.status_code) == (500, 200)
    spans = in_memory_tracing.get_finished_spans()
    servers = [s for s in spans if s.name == "POST /v1/embeddings"]
    batches = [s for s in spans if s.name == "batch"]
    assert len(servers) == 2 and len(batches) == 2
    first, second = sorted(servers, key=lambda s: s.start_time)
    assert first.status.status_code is StatusCode.ERROR and first.attributes["http.response.status_code"] == 500
    assert second.status.status_code is StatusCode.UNSET
    bad = next(b for b in batches if b.links[0].context.span_id == first.context.span_id)
    assert bad.status.status_code is StatusCode.ERROR
    [forward] = [s for s in spans if s.name == "forward" and s.parent.span_id == bad.context.span_id]
    assert forward.status.status_code is StatusCode.ERROR and forward.events[0].name == "exception"
    queue = next(s for s in spans if s.name == "queue" and s.parent.span_id == first.context.span_id)
    assert queue.status.status_code is StatusCode.ERROR


async def test_cohere_embed_is_traced_like_openai(in_memory_tracing: Any) -> None:
    from .conftest import fake_app

    async with fake_app() as app:
        answer = await app.http.post("/v2/embed", json={"model": "fake-model", "texts": ["a", "b"],
                                                        "input_type": "search_document",
                                                        "embedding_types": ["float"]})
    assert answer.status_code == 200, answer.text
    spans = in_memory_tracing.get_finished_spans()
    [server] = [s for s in spans if s.name == "POST /v2/embed"]
    kids = {s.name for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id}
    assert kids == {"tokenize", "queue", "serialize", "batch"}  # (the batch: this request's trace, alone in it)
