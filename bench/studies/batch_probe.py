"""The Batch API against a running server (issue 40, item 5): online latency with and without a large batch
running, in alternating rounds, and the batch's throughput idle and under that load, next to the `embed`
command's in-process speed on the same texts.

    embedding-service serve --demo --engine torch --dtype float32 --host 127.0.0.1 --data-dir /tmp/batch-probe &
    python -m bench.studies.batch_probe --url http://127.0.0.1:8890 [--lines 20000] [--clients 8] [--seconds 10] \
        [--rounds 3] [--idle-lines 4000] [--embed-args "--demo --engine torch --dtype float32"]

Online load: `--clients` closed-loop clients, each posting one ~12-word text after the other for `--seconds`
(with `--think-ms` between a client's answer and its next request: a load that leaves the engine idle gaps).
Each round: the load alone (A), then the load with a fresh `--lines`-line batch running (B; cancelled after),
then an `--idle-lines` batch alone (its texts/s from in_progress to completed) and `embedding-service embed`
on the same texts (texts/s of its embedding, model load excluded, from its own log). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
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


_ONLINE_TEXTS = itertools.count(900_000_000)  # every online request a text never sent before (a result cache
# on the server would otherwise answer the repeats; the batches' texts are numbered below 900,000,000)


async def _online(http: httpx.AsyncClient, clients: int, seconds: float, think_s: float = 0.0) -> list[float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            answer = await http.post("/v1/embeddings", json={"input": _text(next(_ONLINE_TEXTS))})
            answer.raise_for_status()
            latencies.append(time.perf_counter() - start)
            if think_s:
                await asyncio.sleep(think_s)

    await asyncio.gather(*(client() for _ in range(clients)))
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


async def _wait_done(http: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    while (state := await _state(http, batch_id))["status"] not in ("completed", "failed", "cancelled", "expired"):
        await asyncio.sleep(0.05)
    return state


async def _engine_counters(http: httpx.AsyncClient) -> dict[str, float]:
    """Texts embedded and engine seconds by lane, summed over the models (from /metrics)."""
    totals = {"texts": 0.0, "online": 0.0, "batch": 0.0}
    for line in (await http.get("/metrics")).text.splitlines():
        if line.startswith("embedding_texts_total{"):
            totals["texts"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("embedding_engine_busy_seconds_total{"):
            totals["batch" if 'lane="batch"' in line else "online"] += float(line.rsplit(" ", 1)[1])
    return totals


async def _online_with_batch(http: httpx.AsyncClient, args: argparse.Namespace, offset: int
                             ) -> tuple[dict[str, float], float]:
    """The load beside a running batch: its latencies, the batch's texts/s meanwhile (texts the engine
    embedded less the online requests' one each: the batch's own count moves only per committed chunk) and
    its share of the engine's time."""
    batch_id = await _start_batch(http, _batch_file(args.lines, args.texts, offset))
    await _until_running(http, batch_id)
    await asyncio.sleep(1.0)  # (the batch under way: its first chunk admitted)
    before = await _engine_counters(http)
    started = time.perf_counter()
    latencies = await _online(http, args.clients, args.seconds, args.think_ms / 1000)
    after = await _engine_counters(http)
    under = _summary(latencies)
    rate = (after["texts"] - before["texts"] - len(latencies)) / (time.perf_counter() - started)
    busy = {lane: after[lane] - before[lane] for lane in ("online", "batch")}
    under["batch_engine_share"] = round(busy["batch"] / max(1e-9, busy["online"] + busy["batch"]), 3)
    await http.post(f"/v1/batches/{batch_id}/cancel")
    state = await _wait_done(http, batch_id)
    assert state["status"] == "cancelled", state["status"]
    return under, rate


async def _idle_batch(http: httpx.AsyncClient, content: bytes, texts: int) -> float:
    batch_id = await _start_batch(http, content)
    await _until_running(http, batch_id)
    start = time.perf_counter()
    state = await _wait_done(http, batch_id)
    assert state["status"] == "completed", state
    return texts / (time.perf_counter() - start)


def _embed_command(args: argparse.Namespace, texts: list[str]) -> float:
    """`embedding-service embed` on `texts`: texts/s over its run less its model load (both from its log)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "texts.jsonl"
        source.write_bytes(b"".join(orjson.dumps({"text": t}) + b"\n" for t in texts))
        command = [sys.executable, "-m", "embedding_service", "embed", str(source), "-o", str(Path(tmp) / "out.npy"),
                   "--no-progress", *shlex.split(args.embed_args)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=True)
    out = done.stderr + done.stdout
    total = re.search(r"(\d+) rows, \d+ tokens in ([0-9.]+)s", out)
    load = re.search(r"ready on .* in ([0-9.]+)s", out)
    if total is None or load is None:
        raise RuntimeError(f"unexpected output of the embed command: {out[-2000:]}")
    return int(total.group(1)) / (float(total.group(2)) - float(load.group(1)))


def _ratio(a: list[float], b: list[float]) -> float:
    return round(statistics.median(a) / statistics.median(b), 2)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=args.url, timeout=120) as http:
        await _online(http, args.clients, 2.0)  # warm-up
        for r in range(args.rounds):
            alone = _summary(await _online(http, args.clients, args.seconds, args.think_ms / 1000))
            under, under_rate = await _online_with_batch(http, args, 10_000_000 * (r + 1))
            idle_texts = [_text(50_000_000 * (r + 1) + i) for i in range(args.idle_lines)]
            idle_file = b"".join(orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings",
                                               "body": {"input": [t]}}) + b"\n" for i, t in enumerate(idle_texts))
            idle_rate = await _idle_batch(http, idle_file, args.idle_lines)
            embed_rate = _embed_command(args, idle_texts) if args.embed_args else float("nan")
            rounds.append({"online_alone": alone, "online_with_batch": under,
                           "batch_under_load_texts_per_s": round(under_rate, 1),
                           "batch_idle_texts_per_s": round(idle_rate, 1), "embed_command_texts_per_s": embed_rate})
            print(json.dumps(rounds[-1]), file=sys.stderr)
    p50a = [x["online_alone"]["p50_ms"] for x in rounds]
    p50b = [x["online_with_batch"]["p50_ms"] for x in rounds]
    p99a = [x["online_alone"]["p99_ms"] for x in rounds]
    p99b = [x["online_with_batch"]["p99_ms"] for x in rounds]
    return {
        "rounds": rounds,
        "p50_ratio_median": _ratio(p50b, p50a), "p99_ratio_median": _ratio(p99b, p99a),
        "idle_batch_vs_embed_median": _ratio([x["batch_idle_texts_per_s"] for x in rounds],
                                             [x["embed_command_texts_per_s"] for x in rounds]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8890")
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--texts", type=int, default=1, help="texts per line of the large batch")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--think-ms", type=float, default=0.0, help="each client's pause between requests")
    parser.add_argument("--idle-lines", type=int, default=4000, help="lines (one text each) of the idle batch")
    parser.add_argument("--embed-args", default="--demo --engine torch --dtype float32",
                        help="the embed command's model options ('' to skip it)")
    print(json.dumps(asyncio.run(main_async(parser.parse_args()))))


if __name__ == "__main__":
    main()
