"""A lean closed-loop load generator (aiohttp): C requests in flight, bounded in time and count.

The client's own CPU time is measured beside every figure: on a small machine a heavy client (an httpx
client at 64 concurrent requests used half of 2 cores) silently caps what it "measures".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import orjson

__all__ = ["RunResult", "drive", "encode_body", "percentile", "run_async", "wait_ready"]

T = TypeVar("T")


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on uvloop where it is installed (uvicorn[standard] brings it): the loop our server runs
    on (for the in-process ceiling), and a cheaper client: on a small machine the client's CPU is taken from
    the server it measures."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class RunResult:
    requests: int = 0
    texts: int = 0
    tokens: int = 0
    errors: int = 0
    wall_s: float = 0.0
    client_cpu_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    server_cpu_s: float | None = None
    percentiles_ms: tuple[float, float, float] | None = None  # (p50, p95, p99) from a client that keeps no list

    def summary(self) -> dict[str, Any]:
        wall = max(self.wall_s, 1e-9)
        lat = self.latencies_ms
        p50, p95, p99 = self.percentiles_ms or (percentile(lat, 50), percentile(lat, 95), percentile(lat, 99))
        return {
            "requests": self.requests,
            "texts": self.texts,
            "tokens": self.tokens,
            "errors": self.errors,
            "wall_s": round(self.wall_s, 3),
            "texts_per_s": round(self.texts / wall, 2),
            "tokens_per_s": round(self.tokens / wall, 1),
            "requests_per_s": round(self.requests / wall, 2),
            "p50_ms": round(p50, 2),
            "p95_ms": round(p95, 2),
            "p99_ms": round(p99, 2),
            "client_cpu_s": round(self.client_cpu_s, 3),
            "client_cpu_pct": round(100 * self.client_cpu_s / wall, 1),
            "server_cpu_s": None if self.server_cpu_s is None else round(self.server_cpu_s, 3),
            # CPU per request is steadier than throughput on a shared machine.
            "server_cpu_ms_per_req": None
            if self.server_cpu_s is None or not self.requests
            else round(1000 * self.server_cpu_s / self.requests, 3),
            "error_samples": self.error_samples[:3],
        }


def encode_body(texts: list[str], model: str | None, encoding: str, instruction: str | None = None) -> bytes:
    payload: dict[str, Any] = {"input": texts if len(texts) != 1 else texts[0], "encoding_format": encoding}
    if model:
        payload["model"] = model
    if instruction is not None:  # our server's Qwen3 `instruction` field (peers get it formatted client-side)
        payload["instruction"] = instruction
    return orjson.dumps(payload)


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, bytes]:
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
        return response.status, await response.read()


def _usage_tokens(payload: bytes, texts: int) -> tuple[int, bool]:
    """prompt_tokens from the response; also checks it holds one embedding per text."""
    data = orjson.loads(payload)
    ok = len(data.get("data", ())) == texts
    return int((data.get("usage") or {}).get("prompt_tokens") or 0), ok


async def drive(
    url: str,
    requests: Sequence[list[str]],
    *,
    concurrency: int,
    duration_s: float,
    model: str | None = None,
    encoding: str = "float",
    instruction: str | None = None,
    timeout_s: float = 300.0,
) -> RunResult:
    """Send `requests` in order with `concurrency` in flight until all are sent or `duration_s` passes."""
    result = RunResult()
    bodies = [encode_body(texts, model, encoding, instruction) for texts in requests]  # encoded before the clock starts
    counts = [len(texts) for texts in requests]
    next_index = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        deadline = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(bodies) and time.perf_counter() < deadline:
                index = next_index
                next_index += 1
                started = time.perf_counter()
                try:
                    status, payload = await _post(session, url, bodies[index])
                    if status == 200:
                        tokens, complete = _usage_tokens(payload, counts[index])
                        if not complete:
                            raise ValueError("wrong number of embeddings in the response")
                    else:
                        raise ValueError(f"HTTP {status}: {payload[:200]!r}")
                except Exception as exc:  # counted, sampled, and the run goes on
                    result.errors += 1
                    if len(result.error_samples) < 5:
                        result.error_samples.append(f"{type(exc).__name__}: {exc}"[:300])
                    continue
                result.latencies_ms.append((time.perf_counter() - started) * 1000)
                result.requests += 1
                result.texts += counts[index]
                result.tokens += tokens

        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - wall0
        result.client_cpu_s = time.process_time() - cpu0
    return result


async def wait_ready(url: str, *, model: str | None, timeout_s: float, alive: Any = None) -> None:
    """Poll with a one-text embedding request until it succeeds (works for every OpenAI-compatible peer)."""
    body = encode_body(["ready?"], model, "float")
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError(f"server exited before it was ready ({last})")
            try:
                status, payload = await _post(session, url, body)
                if status == 200:
                    return
                last = f"HTTP {status}: {payload[:160]!r}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                last = type(exc).__name__
            await asyncio.sleep(1.0)
    raise TimeoutError(f"server not ready after {timeout_s:.0f}s ({last})")
