"""Our engine behind the least HTTP work possible: a floor for the request path, not a server to deploy.

    python -m bench --models minilm --targets inproc,ours-vllm,bare-vllm --workloads short-c16,short-c64

An asyncio protocol on uvloop parses each request with httptools, validates the body as `serve` does
(`parse_embedding_request`), awaits our engine and writes the response in one call: no ASGI, no middleware,
no request ids, limits, metrics or error envelopes (a bad request drops the connection). What `serve` costs
beyond this is the price of everything it adds; what this costs beyond the engine in-process is the floor that
no Python HTTP server on the same cores gets under (client, kernel, parsing). Bench-only: it starts like
`serve` (OpenMP's wait policy, the engine's per-request log lines at INFO, the start-up heap frozen).

    python -m bench.bare_server --port 8000 --engine vllm --model-path DIR [--dtype float32] [--max-model-len N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

__all__ = ["main"]


class BareHttp(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one request at a time per connection (as the benchmark's clients send them)."""

    def __init__(self, engine: Any, model: str) -> None:
        import httptools

        self.engine = engine
        self.model = model
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:
            self._close()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        asyncio.get_running_loop().create_task(self.answer(body))

    async def answer(self, body: bytes) -> None:
        import orjson

        from embedding_service.api.embed.protocol import encode_embeddings, parse_embedding_request

        try:
            request, encoding = parse_embedding_request(orjson.loads(body))
            result = await self.engine.embed(request)
        except Exception:
            self._close()
            return
        out = encode_embeddings(result.vectors, encoding, self.model, result.prompt_tokens)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(out), out))

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def serve(args: argparse.Namespace) -> None:
    from embedding_service.config import EmbeddingConfig
    from embedding_service.server import freeze_startup_heap
    from embedding_service.service import build_embedding_engine, plan_service

    settings = EmbeddingConfig(_env_file=None, engine=args.engine, dtype=args.dtype,  # type: ignore[call-arg]
                               max_model_len=args.max_model_len,
                               **({"model_path": args.model_path} if args.model_path else {}))
    engine = build_embedding_engine(plan_service(settings).embed)
    await engine.start()
    freeze_startup_heap()
    server = await asyncio.get_running_loop().create_server(lambda: BareHttp(engine, args.served_model_name),
                                                            args.host, args.port)
    print(f"bare server on http://{args.host}:{args.port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--engine", default="vllm")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--served-model-name", default="bench-model")
    args = parser.parse_args(argv)

    from embedding_service.logging_config import configure_logging
    from embedding_service.service import openmp_waits_for

    os.environ.update(openmp_waits_for([args.engine]))  # before torch loads OpenMP, as `serve` does
    configure_logging("INFO")
    import uvloop

    try:
        uvloop.run(serve(args))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
