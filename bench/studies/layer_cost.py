"""What each layer of `serve`'s request path costs per request, in-process: no client, no sockets, no noise.

    python -m bench.studies.layer_cost                    # CPU µs per request (min over rounds; noisy on a shared VM)
    python -m bench.studies.layer_cost --callgrind        # instructions per request under valgrind: deterministic

One embedding request (one short text, 384-dimension fake engine, 64 requests in flight on 64 keep-alive
connections) goes through, cumulatively:
- `engine`: parse the body, our engine (tokenise, batch, the fake model in its thread), encode: no HTTP;
- `uvicorn`: our connection protocol (uvicorn's httptools protocol, guarded) over a null transport, with an
  ASGI app that answers a constant: the HTTP parsing and ASGI messages alone;
- `route`: that protocol calling the embeddings endpoint through the direct lane (api/direct_routes.py);
- `lifecycle`, `context`: with the hang-up / error layer, then request ids, timing headers and metrics;
- `app`: the whole app as `serve` builds it (FastAPI/Starlette's outer layers too).
`route` - `engine` - `uvicorn` is the endpoint's own HTTP work; each later step is one layer's price.
Under `--callgrind` each variant runs twice (`--requests` and 11x that) and the difference is divided, so
start-up is left out; valgrind counts instructions, so the figures repeat to ~2% and add up.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

__all__ = ["VARIANTS", "main"]

VARIANTS = ("engine", "uvicorn", "route", "lifecycle", "context", "app")
CONCURRENCY = 64
BODY = orjson.dumps({"input": "hello world this is a short text", "model": "fake-model"})
REQUEST = (b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))


class NullTransport:
    """The socket side of one connection: each response's last write sends the next request."""

    def __init__(self, on_response: Callable[[], None]) -> None:
        self.on_response = on_response

    def write(self, data: bytes) -> None:
        self.on_response()

    def writelines(self, parts: list[bytes]) -> None:
        self.on_response()

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def constant_app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


async def over_connections(app: Any, requests: int) -> None:
    """`requests` requests through our protocol class, CONCURRENCY connections each sending its next at once."""
    import uvicorn
    from uvicorn.server import ServerState

    from embedding_service.transport import ConnectionLimits, guarded_protocol

    config = uvicorn.Config(app, http=guarded_protocol(ConnectionLimits()), log_config=None, lifespan="off",
                            access_log=False, proxy_headers=False)
    config.load()
    loop = asyncio.get_running_loop()
    left, finished = [requests], loop.create_future()
    for _ in range(CONCURRENCY):
        protocol = config.http_protocol_class(config=config, server_state=ServerState(),  # type: ignore[call-arg]
                                              app_state={})

        def answered(protocol: Any = protocol) -> None:
            left[0] -= 1
            if left[0] > 0:
                loop.call_soon(protocol.data_received, REQUEST)
            elif not finished.done():
                finished.set_result(None)

        protocol.connection_made(NullTransport(answered))  # type: ignore[arg-type]
        protocol.data_received(REQUEST)
    await finished


async def engine_only(engine: Any, requests: int) -> None:
    from embedding_service.api.embed.protocol import encode_embeddings, parse_embedding_request

    async def client() -> None:
        for _ in range(requests // CONCURRENCY):
            request, encoding = parse_embedding_request(orjson.loads(BODY))
            result = await engine.embed(request)
            encode_embeddings(result.vectors, encoding, "fake-model", result.prompt_tokens)

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))


def _layers(app: Any) -> dict[str, Callable[[int], Awaitable[None]]]:
    """Each variant as a function of the request count, over one app (its middleware stack as `serve` has it)."""
    from embedding_service.api.direct_routes import DirectRoutes
    from embedding_service.api.middleware.lifecycle import RequestLifecycle
    from embedding_service.api.middleware.request_context import RequestContextMiddleware

    stack, direct = app.build_middleware_stack(), None
    while stack is not None and direct is None:
        direct = stack if isinstance(stack, DirectRoutes) else None
        stack = getattr(stack, "app", None)
    assert direct is not None, "the app has no direct lane"

    async def unrouted(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError(f"{scope['path']} is not a direct route")

    route = DirectRoutes(unrouted, direct.routes, direct.on_service_error)  # (the app's own error handler)
    lifecycle = RequestLifecycle(route)
    context = RequestContextMiddleware(lifecycle, observer=app.state.metrics.observe_request, closing=lambda: False)
    return {"engine": lambda n: engine_only(app.state.engine, n),
            "uvicorn": lambda n: over_connections(constant_app, n),
            "route": lambda n: over_connections(route, n), "lifecycle": lambda n: over_connections(lifecycle, n),
            "context": lambda n: over_connections(context, n), "app": lambda n: over_connections(app, n)}


async def measure(variants: list[str], requests: int, rounds: int) -> dict[str, float]:
    """CPU µs per request of each variant: the minimum over `rounds`, variants taking turns."""
    import logging

    from embedding_service.logging_config import configure_logging

    configure_logging("INFO")  # the engine's per-request line, as `serve` logs it; written nowhere here
    with open(os.devnull, "w") as sink:
        logging.root.handlers[0].setStream(sink)  # type: ignore[attr-defined]
        return await _measure(variants, requests, rounds)


async def _measure(variants: list[str], requests: int, rounds: int) -> dict[str, float]:
    from embedding_service.api.app import create_app
    from embedding_service.backends.fake.embed import FakeBackend
    from embedding_service.config import EmbeddingConfig
    from embedding_service.engine.engine import EmbeddingEngine, EngineOptions

    settings = EmbeddingConfig(_env_file=None, engine="fake", served_model_name="fake-model")  # type: ignore[call-arg]
    engine = EmbeddingEngine(FakeBackend(dimension=384, record_batches=False), EngineOptions.from_config(settings))
    await engine.start()
    app = create_app(settings, engine)
    layers = _layers(app)
    best: dict[str, float] = {}
    async with app.router.lifespan_context(app):
        gc.collect()
        gc.freeze()  # as `serve` does after start-up
        for _ in range(rounds):
            for name in variants:
                started = time.process_time()
                await layers[name](requests)
                best[name] = min(best.get(name, float("inf")), (time.process_time() - started) / requests * 1e6)
    await engine.stop()
    return best


def _instructions(variant: str, requests: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out", sys.executable,
                              "-m", "bench.studies.layer_cost", "--variants", variant, "--requests", str(requests),
                              "--rounds", "1"], capture_output=True, text=True, check=True).stderr
    found = re.search(r"Collected : (\d+)", out)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind:\n{out[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m bench.studies.layer_cost")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--requests", type=int, default=CONCURRENCY * 10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--callgrind", action="store_true", help="count instructions under valgrind instead")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    if args.callgrind:
        small = CONCURRENCY
        for name in variants:
            per = (_instructions(name, small * 11) - _instructions(name, small)) / (small * 10)
            print(f"{name:10s} {per / 1000:8.1f} k instructions per request", flush=True)
        return 0
    import uvloop

    for name, micros in uvloop.run(measure(variants, args.requests, args.rounds)).items():
        print(f"{name:10s} {micros:8.1f} µs CPU per request (min of {args.rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
