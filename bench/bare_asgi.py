"""The issue's floor for the request path: a bare ~30-line ASGI app that parses the same JSON and returns a
fixed vector, on uvicorn with uvloop and httptools as `serve` runs. No engine, no validation, no middleware.

    python -m bench --overhead --targets ours-fake,bare-asgi,bare-fake --workloads short-c16
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

__all__ = ["app", "main"]

VECTOR = [0.125] * 64  # the fake engine's dimension


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    data = orjson.loads(body)
    texts = data["input"] if isinstance(data["input"], list) else [data["input"]]
    out = orjson.dumps({"object": "list", "model": data.get("model", "bench-model"),
                        "data": [{"object": "embedding", "index": i, "embedding": VECTOR} for i in range(len(texts))],
                        "usage": {"prompt_tokens": 0, "total_tokens": 0}})
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": out})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_asgi", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args, _rest = parser.parse_known_args(argv)
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
