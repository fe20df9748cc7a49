"""What tracing costs per request, in process: the real app over the fake engine, one request at a time straight
into its ASGI callable (no sockets, no client), so the server's own per-request work is all that is timed.

    python -m bench.studies.tracing_overhead --mode off        # no --otlp-endpoint: what every untraced server pays
    python -m bench.studies.tracing_overhead --mode unsampled  # sample ratio 0: the cost of the switch + sampler
    python -m bench.studies.tracing_overhead --mode on         # every request traced and exported (to a local receiver)

`off` runs on a tree without tracing too (PYTHONPATH=<that tree>/src): the before/after of "no cost when off".
Prints one JSON line: wall and CPU microseconds per request, the median and best of the repeats (on a shared
machine compare the CPU figures, and interleave the modes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

_RECEIVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


async def _one(app: Any, body: bytes, traceparent: bool = True) -> int:
    status = 0
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)  # (never: the handler has read its body)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/embeddings", "raw_path": b"/v1/embeddings", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *([(b"traceparent", _TRACEPARENT)] if traceparent else [])],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8890), "extensions": {}}
    await app(scope, receive, send)
    return status


_TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # a caller's sampled trace


async def run(mode: str, requests: int, repeats: int) -> dict[str, Any]:
    from embedding_service.api.app import create_app
    from embedding_service.backends.fake.embed import FakeBackend
    from embedding_service.config import EmbeddingConfig
    from embedding_service.engine.engine import EmbeddingEngine
    from embedding_service.engine.options import EngineOptions

    receiver = None
    if mode != "off":
        from embedding_service import tracing

        receiver = subprocess.Popen([sys.executable, "-c", _RECEIVER], stdout=subprocess.PIPE, text=True)
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        tracing.configure(f"http://127.0.0.1:{port}", "bench", 1.0 if mode == "on" else 0.0)
    settings = EmbeddingConfig(_env_file=None, engine="fake", served_model_name="fake", log_level="WARNING")  # type: ignore[call-arg]
    engine = EmbeddingEngine(FakeBackend(dimension=64, max_model_len=64), EngineOptions.from_config(settings))
    await engine.start()
    app = create_app(settings, engine)
    traced = mode != "unsampled"  # unsampled: new traces, none kept (a caller's sampled flag would be followed)
    body = json.dumps({"input": ["a short query of a few words", "another one"]}).encode()
    for _ in range(500):  # warm-up: imports, caches, the middleware stack is built on the first call
        assert await _one(app, body, traced) == 200
    per_request, cpu_per_request = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(requests):
            await _one(app, body, traced)
        per_request.append((time.perf_counter() - started) / requests * 1e6)
        # CPU time (all threads: the fake model's and, when on, the exporter's) holds up on a busy machine
        cpu_per_request.append((time.process_time() - cpu_started) / requests * 1e6)
    await engine.stop()
    if receiver is not None:
        from embedding_service import tracing

        tracing.shutdown()
        receiver.terminate()
    return {"mode": mode, "requests": requests, "repeats": repeats,
            "us_per_request_median": round(statistics.median(per_request), 1),
            "us_per_request_best": round(min(per_request), 1),
            "cpu_us_per_request_median": round(statistics.median(cpu_per_request), 1),
            "cpu_us_per_request_best": round(min(cpu_per_request), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("off", "unsampled", "on"), default="off")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import logging

    logging.disable(logging.INFO)  # the per-request log lines would be most of what is timed
    print(json.dumps(asyncio.run(run(args.mode, args.requests, args.repeats))))


if __name__ == "__main__":
    main()
