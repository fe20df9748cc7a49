"""The Batch API against a running server: online latency with and without a batch running, and the batch's
throughput idle and under that load. A first probe, not yet part of `python -m bench` (issue 40, item 5).

    embedding-service serve --demo --engine torch --data-dir /tmp/batch-probe &
    python -m bench.batch_probe --url http://127.0.0.1:8890 [--lines 400] [--texts 16] [--clients 4] [--seconds 10]

Online load: `--clients` clients, each posting one ~12-word text after the other for `--seconds`. A batch:
`--lines` lines of `--texts` distinct ~12-word texts each. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httpx
import orjson

_WORDS = ["the", "a", "river", "model", "vector", "quiet", "engine", "paper", "stone", "light", "window",
          "market", "garden", "theory"]


def _text(i: int) -> str:
    return " ".join(_WORDS[(i * 7 + k * 3) % len(_WORDS)] for k in range(11)) + f" {i}"


def _batch_file(lines: int, texts: int, offset: int) -> bytes:
    return b"".join(orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings", "body": {
        "input": [_text(offset + i * texts + k) for k in range(texts)]}}) + b"\n" for i in range(lines))


async def _online(http: httpx.AsyncClient, clients: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(n: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            answer = await http.post("/v1/embeddings", json={"input": _text(10_000_000 + n * 1_000_000 + i)})
            answer.raise_for_status()
            latencies.append(time.perf_counter() - start)
            i += 1

    await asyncio.gather(*(client(n) for n in range(clients)))
    return latencies


def _summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)  # noqa: E731
    return {"requests": len(ordered), "p50_ms": pick(0.5), "p99_ms": pick(0.99)}


async def _start_batch(http: httpx.AsyncClient, content: bytes) -> str:
    uploaded = (await http.post("/v1/files", files={"file": ("probe.jsonl", content)}, data={"purpose": "batch"}))
    uploaded.raise_for_status()
    made = await http.post("/v1/batches", json={"input_file_id": uploaded.json()["id"],
                                                "endpoint": "/v1/embeddings", "completion_window": "24h"})
    made.raise_for_status()
    return str(made.json()["id"])


async def _state(http: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    return dict((await http.get(f"/v1/batches/{batch_id}")).json())


async def _until_running(http: httpx.AsyncClient, batch_id: str) -> None:
    while (await _state(http, batch_id))["status"] == "validating":
        await asyncio.sleep(0.05)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=args.url, timeout=120) as http:
        await _online(http, args.clients, 2.0)  # warm-up
        baseline = _summary(await _online(http, args.clients, args.seconds))
        # The batch alone: texts per second from in_progress to completed.
        batch_id = await _start_batch(http, _batch_file(args.lines, args.texts, 0))
        await _until_running(http, batch_id)
        start = time.perf_counter()
        while (state := await _state(http, batch_id))["status"] not in ("completed", "failed", "cancelled"):
            await asyncio.sleep(0.05)
        idle_s = time.perf_counter() - start
        # The batch again, with the online load beside it.
        batch_id = await _start_batch(http, _batch_file(args.lines, args.texts, 1_000_000))
        await _until_running(http, batch_id)
        before = (await _state(http, batch_id))["request_counts"]["completed"]
        under = _summary(await _online(http, args.clients, args.seconds))
        after = (await _state(http, batch_id))["request_counts"]["completed"]
        await http.post(f"/v1/batches/{batch_id}/cancel")
        while (await _state(http, batch_id))["status"] != "cancelled":
            await asyncio.sleep(0.05)
        again = _summary(await _online(http, args.clients, args.seconds))  # the baseline again: how noisy it is
    return {
        "online_alone": baseline, "online_with_batch": under, "online_alone_again": again,
        "p50_ratio": round(under["p50_ms"] / baseline["p50_ms"], 2),
        "p99_ratio": round(under["p99_ms"] / baseline["p99_ms"], 2),
        "batch_idle_texts_per_s": round(args.lines * args.texts / idle_s, 1),
        "batch_under_load_texts_per_s": round((after - before) * args.texts / args.seconds, 1),
        "idle_batch_status": state["status"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8890")
    parser.add_argument("--lines", type=int, default=400)
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    print(json.dumps(asyncio.run(main_async(parser.parse_args()))))


if __name__ == "__main__":
    main()
