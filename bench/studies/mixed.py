"""Mixed traffic: embedding and rerank clients at the same time, against one server serving both models.

    python -m bench.studies.mixed --seconds 60 -- --demo --engine vllm --rerank-model-path DIR   # starts `serve`
    python -m bench.studies.mixed --seconds 60 --url http://127.0.0.1:8000                       # or a running one
    python -m bench.studies.mixed --seconds 60 --rerank-clients 0 -- --demo --engine vllm        # one model alone

Closed-loop clients: `--embed-clients` send `--texts` distinct texts a request to /v1/embeddings, and
`--rerank-clients` one query with `--documents` distinct documents to /v1/rerank. Every text is new (a
counter in it), so vLLM's prefix cache cannot make repeats look fast. Reports texts/s, docs/s, p50/p99 and
every answer that is not a 200 (a server that dies mid-run shows here as errors, not as a short run).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from ..loadgen import percentile, run_async
from ..peers import free_port
from ..workloads import _WORDS

__all__ = ["main", "run_mixed"]


def _text(rng: random.Random, serial: int, words: int) -> str:
    return f"{serial} " + " ".join(rng.choice(_WORDS) for _ in range(words))


async def _client(session: aiohttp.ClientSession, url: str, make_body: Any, stop_at: float, stats: dict[str, Any],
                  items: int) -> None:
    while time.perf_counter() < stop_at:
        body = make_body()
        started = time.perf_counter()
        try:
            async with session.post(url, data=body) as response:
                await response.read()
                status = response.status
        except aiohttp.ClientError as exc:
            status = type(exc).__name__
        if status == 200:
            stats["latencies"].append((time.perf_counter() - started) * 1000)
            stats["items"] += items
        else:
            stats["errors"][str(status)] += 1
            await asyncio.sleep(0.05)  # a dead server answers at once: do not spin


async def run_mixed(base: str, *, seconds: float, embed_clients: int, rerank_clients: int, texts: int,
                    documents: int, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    serial = itertools.count()

    def embed_body() -> bytes:
        return orjson.dumps({"input": [_text(rng, next(serial), 12) for _ in range(texts)]})

    def rerank_body() -> bytes:
        return orjson.dumps({"query": _text(rng, next(serial), 8),
                             "documents": [_text(rng, next(serial), 40) for _ in range(documents)]})

    stats = {kind: {"latencies": [], "items": 0, "errors": Counter()} for kind in ("embed", "rerank")}
    async with aiohttp.ClientSession(headers={"Content-Type": "application/json"}) as session:
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(
            *(_client(session, base + "/v1/embeddings", embed_body, stop_at, stats["embed"], texts)
              for _ in range(embed_clients)),
            *(_client(session, base + "/v1/rerank", rerank_body, stop_at, stats["rerank"], documents)
              for _ in range(rerank_clients)))
        wall = time.perf_counter() - started
    out: dict[str, Any] = {"seconds": round(wall, 1), "embed_clients": embed_clients,
                           "rerank_clients": rerank_clients, "texts_per_request": texts,
                           "documents_per_request": documents}
    for kind, unit in (("embed", "texts_per_s"), ("rerank", "docs_per_s")):
        s = stats[kind]
        out[kind] = {"requests": len(s["latencies"]), unit: round(s["items"] / wall, 1),
                     "p50_ms": round(percentile(s["latencies"], 50), 1) if s["latencies"] else None,
                     "p99_ms": round(percentile(s["latencies"], 99), 1) if s["latencies"] else None,
                     "errors": dict(s["errors"])}
    return out


async def _wait_healthy(base: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited ({process.returncode}) before it was ready")
            try:
                async with session.get(base + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"not ready after {timeout_s}s")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m bench.studies.mixed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (else one is started with the arguments after --)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--embed-clients", type=int, default=8)
    parser.add_argument("--rerank-clients", type=int, default=4)
    parser.add_argument("--texts", type=int, default=4, help="texts per embedding request")
    parser.add_argument("--documents", type=int, default=10, help="documents per rerank request")
    parser.add_argument("--out", type=Path, help="write the result (JSON) here too")
    parser.add_argument("--label", default="", help="a name for this run in the result")
    args = parser.parse_args(own)
    process: subprocess.Popen[bytes] | None = None
    base = (args.url or "").rstrip("/")
    if not base:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(os.devnull if args.out is None else args.out.with_suffix(".log"), "wb")  # noqa: SIM115
        process = subprocess.Popen([sys.executable, "-m", "embedding_service", "serve", "--host", "127.0.0.1",
                                    "--port", str(port), *serve_args], stdout=log, stderr=subprocess.STDOUT)
    try:
        if process is not None:
            run_async(_wait_healthy(base, process, 600))
        result = run_async(run_mixed(base, seconds=args.seconds, embed_clients=args.embed_clients,
                                     rerank_clients=args.rerank_clients, texts=args.texts,
                                     documents=args.documents))
        if process is not None:
            result["server_alive_after"] = process.poll() is None
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
    result = {"label": args.label, "serve_args": serve_args, **result}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
