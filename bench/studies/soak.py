"""Does the server's memory stay flat under long traffic, hostile clients included? A soak run.

    python -m bench.studies.soak --minutes 30 -- --demo --engine vllm --dtype float32    # starts `serve` with these
    python -m bench.studies.soak --minutes 5 --url http://127.0.0.1:8890 --pid PID         # or watches a running one
    python -m bench.studies.soak --compare before=A/soak.json after=B/soak.json --out both.png

Every round (default 20 s) sends the same mix, then samples the server: resident memory of the process and
its children (vLLM's engine core may be one), open file descriptors and threads. The mix, per round:
- `clients` closed-loop clients, each request 1-8 distinct texts, float or base64, half with their own
  X-Request-Id (nothing may be kept per id); a quarter are reranks (1-16 documents) when a reranker is served;
- every bad request of `BAD_REQUESTS` (each its 4xx), a 404 on a path never seen before, a huge declared body,
  and with `api_key` a request with a wrong key (401);
- clients that hang up: a 32-text request, then the socket closes before the answer (the work is dropped);
- clients that stop half-way through their body, then close;
- /metrics and /health scrapes.
A 5xx, a bad request answered 200, or a good one not answered 200 is counted as `wrong`.

The verdict (`memory_growth`): after `--warmup` rounds (the allocator's arenas and the caches fill, the
batch shapes settle), the least-squares slope of RSS in MB per hour and bytes per request. Results go to
`--out` (JSON) with a chart of RSS, descriptors and requests per round (PNG).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import orjson
import psutil

from ..loadgen import run_async
from ..peers import free_port

__all__ = ["BAD_REQUESTS", "Round", "compare_chart", "main", "memory_growth", "process_sample", "rerank_model",
           "soak", "soak_round", "wait_healthy"]

# (name, body, content type, expected status): each malformed the way real clients get it wrong.
BAD_REQUESTS: list[tuple[str, bytes, str, int]] = [
    ("invalid-json", b'{"input": ["a", }', "application/json", 400),
    ("input-wrong-type", b'{"input": {"text": "a"}}', "application/json", 400),
    ("empty-input", b'{"input": []}', "application/json", 400),
    ("empty-string", b'{"input": ""}', "application/json", 400),
    ("bad-encoding", b'{"input": "a", "encoding_format": "int4"}', "application/json", 400),
    ("not-json", b"input=a", "application/x-www-form-urlencoded", 415),
]
BAD_RERANKS: list[tuple[str, bytes, int]] = [
    ("no-query", b'{"documents": ["a"]}', 400),
    ("documents-not-a-list", b'{"query": "q", "documents": "a"}', 400),
]
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
         "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
         "xray", "yankee", "zulu", "river", "stone", "cloud", "light"]


@dataclass
class Round:
    """One round's traffic and the server's state after it."""

    index: int
    at_s: float  # since the start of the soak
    good: int = 0
    reranks: int = 0  # of the good requests, reranks answered 200
    bad: int = 0
    hangups: int = 0
    partial: int = 0
    wrong: int = 0  # a 5xx, a bad request answered 200, a good one not answered 200
    wrong_examples: list[str] = field(default_factory=list)
    rss_mb: float = 0.0
    fds: int = 0
    threads: int = 0


def process_sample(pid: int) -> tuple[float, int, int]:
    """(RSS in MB of `pid` and its descendants, open descriptors of `pid`, its threads), as psutil reads them
    (the way bench/peers.py sums a server's CPU time over its children)."""
    root = psutil.Process(pid)
    rss = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # (a child that exited while we looked)
            rss += proc.memory_info().rss
    return rss / (1024 * 1024), root.num_fds(), root.num_threads()


def memory_growth(rounds: list[Round], warmup: int) -> dict[str, float]:
    """RSS after the warm-up rounds: MB from the first to the last, the fitted slope in MB per hour, and
    bytes per request (slope over the requests sent, all kinds)."""
    kept = rounds[warmup:]
    if len(kept) < 2:
        raise ValueError(f"need at least 2 rounds after the {warmup} warm-up rounds, have {len(kept)}")
    hours = np.array([r.at_s for r in kept]) / 3600
    rss = np.array([r.rss_mb for r in kept])
    sent = np.cumsum([r.good + r.bad + r.hangups + r.partial for r in kept])
    per_hour = float(np.polyfit(hours, rss, 1)[0])
    per_request = float(np.polyfit(sent, rss, 1)[0]) * 1024 * 1024
    return {"rss_start_mb": float(rss[0]), "rss_end_mb": float(rss[-1]), "rss_max_mb": float(rss.max()),
            "growth_mb": float(rss[-1] - rss[0]), "slope_mb_per_hour": per_hour,
            "slope_bytes_per_request": per_request, "requests": int(sent[-1])}


def _texts(rng: random.Random, serial: itertools.count[int]) -> list[str]:
    return [f"{next(serial)} " + " ".join(rng.choices(WORDS, k=rng.randint(3, 40))) for _ in range(rng.randint(1, 8))]


async def _raw(host: str, port: int, data: bytes) -> None:
    """Send `data` on a new connection and close it without reading the answer."""
    _, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    await writer.drain()
    await asyncio.sleep(0.01)
    writer.close()
    await writer.wait_closed()


def _post_bytes(path: str, host: str, body: bytes, declared: int | None = None,
                headers: dict[str, str] | None = None) -> bytes:
    length = len(body) if declared is None else declared
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {length}\r\n\r\n").encode() + body


async def rerank_model(base: str, api_key: str | None = None) -> str | None:
    """The name of the reranker the server at `base` serves, if any (from /v1/models)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession() as session, session.get(base + "/v1/models", headers=headers) as response:
        cards = (await response.json()).get("data", [])
    return next((card["id"] for card in cards if card.get("task") == "rerank"), None)


async def soak_round(base: str, model: str | None, *, clients: int, seconds: float, rng: random.Random,
                     serial: itertools.count[int], index: int, started: float, reranker: str | None = None,
                     api_key: str | None = None) -> Round:
    """One round of the mix against `base` (http://host:port)."""
    result = Round(index=index, at_s=0.0)
    url, rerank_url = base + "/v1/embeddings", base + "/v1/rerank"
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    host, port = urlsplit(base).hostname or "127.0.0.1", urlsplit(base).port or 80
    deadline = time.monotonic() + seconds

    def wrong(what: str) -> None:
        result.wrong += 1
        if len(result.wrong_examples) < 5:
            result.wrong_examples.append(what)

    async def good_client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            body: dict[str, Any] = {"input": _texts(rng, serial), "encoding_format": rng.choice(["float", "base64"])}
            target = url
            if model:
                body["model"] = model
            if reranker is not None and rng.random() < 0.25:
                documents = [text for _ in range(rng.randint(1, 2)) for text in _texts(rng, serial)]
                body = {"model": reranker, "query": _texts(rng, serial)[0], "documents": documents,
                        "top_n": rng.randint(1, len(documents))}
                target = rerank_url
            headers = {"Content-Type": "application/json", **auth}
            if rng.random() < 0.5:
                headers["X-Request-Id"] = f"soak-{next(serial)}"
            async with session.post(target, data=orjson.dumps(body), headers=headers) as response:
                await response.read()
                result.good += 1
                if response.status != 200:
                    wrong(f"good request: {response.status}")
                elif target == rerank_url:
                    result.reranks += 1

    async def bad_requests(session: aiohttp.ClientSession) -> None:
        bad = [(url, name, body, content_type, expected) for name, body, content_type, expected in BAD_REQUESTS]
        if reranker is not None:
            bad += [(rerank_url, name, body, "application/json", expected) for name, body, expected in BAD_RERANKS]
        for target, name, body, content_type, expected in bad:
            async with session.post(target, data=body, headers={"Content-Type": content_type, **auth}) as response:
                await response.read()
                result.bad += 1
                if response.status != expected:
                    wrong(f"{name}: {response.status}, expected {expected}")
        if api_key:
            wrong_key = {"Authorization": f"Bearer wrong-{next(serial)}"}
            async with session.post(url, data=b'{"input": "a"}', headers=wrong_key) as response:
                await response.read()
                result.bad += 1
                if response.status != 401:
                    wrong(f"wrong key: {response.status}, expected 401")
        for method, path, expected in (("GET", f"/never-seen/{next(serial)}", 404), ("PUT", "/v1/embeddings", 405)):
            async with session.request(method, base + path, headers=auth) as response:
                await response.read()
                result.bad += 1
                if response.status != expected:
                    wrong(f"{method} {path}: {response.status}, expected {expected}")
        for path in ("/metrics", "/health"):
            async with session.get(base + path, headers=auth) as response:
                await response.read()
                if response.status != 200:
                    wrong(f"GET {path}: {response.status}")
        await _raw(host, port, _post_bytes("/v1/embeddings", host, b"{}", 10**9, auth))  # 413, declared size
        result.bad += 1

    async def hostile() -> None:
        while time.monotonic() < deadline:
            body = orjson.dumps({"input": [f"{next(serial)} hang up " * 8 for _ in range(32)]})
            await _raw(host, port, _post_bytes("/v1/embeddings", host, body, None, auth))  # then gone before the answer
            result.hangups += 1
            await _raw(host, port, _post_bytes("/v1/embeddings", host, body[: len(body) // 2], len(body), auth))
            result.partial += 1
            await asyncio.sleep(0.2)

    timeout = aiohttp.ClientTimeout(total=max(60.0, seconds * 3))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(bad_requests(session), hostile(), *(good_client(session) for _ in range(clients)))
    result.at_s = time.monotonic() - started
    return result


async def soak(base: str, pid: int, model: str | None, *, rounds: int, clients: int, seconds: float,
               seed: int = 0, api_key: str | None = None, progress: bool = False) -> list[Round]:
    """`rounds` rounds against the server at `base` whose process is `pid`; each sampled after it ends."""
    rng, serial, started, out = random.Random(seed), itertools.count(), time.monotonic(), []
    reranker = await rerank_model(base, api_key)
    for index in range(rounds):
        result = await soak_round(base, model, clients=clients, seconds=seconds, rng=rng, serial=serial,
                                  index=index, started=started, reranker=reranker, api_key=api_key)
        await asyncio.sleep(0.5)  # the round's hung-up work and closed connections are settled
        result.rss_mb, result.fds, result.threads = process_sample(pid)
        out.append(result)
        if progress:
            print(f"round {index:3d} {result.at_s:7.0f}s  rss {result.rss_mb:8.1f} MB  fds {result.fds:4d}  "
                  f"threads {result.threads:3d}  good {result.good:6d} bad {result.bad:3d} hang-ups "
                  f"{result.hangups:4d} partial {result.partial:4d} wrong {result.wrong}", flush=True)
    return out


def chart(rounds: list[Round], warmup: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r.at_s / 60 for r in rounds]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    top.plot(minutes, [r.rss_mb for r in rounds], marker=".")
    top.axvspan(0, minutes[warmup - 1] if warmup else 0, color="0.9", label="warm-up")
    top.set_ylim(0, max(r.rss_mb for r in rounds) * 1.1)  # (an autoscaled axis makes 0.1 MB look like a cliff)
    top.set_ylabel("RSS (MB)")
    top.legend(loc="lower right")
    bottom.plot(minutes, [r.fds for r in rounds], label="open descriptors")
    bottom.plot(minutes, [r.threads for r in rounds], label="threads")
    bottom.set_ylim(0, max(max(r.fds, r.threads) for r in rounds) * 1.15)
    bottom.set_xlabel("minutes")
    bottom.legend(loc="lower right")
    _save(fig, path)


async def wait_healthy(base: str, timeout_s: float, alive: Any = None, api_key: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError("server exited before it was ready")
            try:
                async with session.get(base + "/health", headers=headers) as response:
                    if response.status == 200:
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"server not healthy after {timeout_s:.0f}s")


def compare_chart(runs: dict[str, Path], path: Path) -> None:
    """RSS per minute of several soak.json files on one chart (e.g. before / after a fix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for label, source in runs.items():
        rounds = json.loads(source.read_text())["rounds"]
        ax.plot([r["at_s"] / 60 for r in rounds], [r["rss_mb"] for r in rounds], marker=".", label=label)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle("Server memory under a soak (bench/studies/soak.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _start(serve_args: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "embedding_service", "serve", "--host", "127.0.0.1", "--port", str(port),
           *serve_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
    process = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m bench.studies.soak")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--round-seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=int, default=3, help="rounds left out of the verdict")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--url", help="a running server (http://host:port); needs --pid")
    parser.add_argument("--pid", type=int, help="its process id (for /proc)")
    parser.add_argument("--model", help="model name to send (default: none)")
    parser.add_argument("--api-key", help="the key to send, when the server requires one")
    parser.add_argument("--out", type=Path, default=Path("bench/runs") / time.strftime("soak-%Y-%m-%d-%H%M"))
    parser.add_argument("--compare", nargs="+", metavar="LABEL=SOAK.JSON",
                        help="no soak: draw these runs' RSS on one chart, --out being the PNG")
    parser.add_argument("serve_args", nargs="*", help="after --: flags for `serve` (when no --url)")
    args = parser.parse_args(argv)
    if args.compare:
        compare_chart({label: Path(path) for label, _, path in (item.partition("=") for item in args.compare)},
                      args.out)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    process = None
    if args.url:
        if args.pid is None:
            parser.error("--url needs --pid")
        base, pid = args.url.rstrip("/"), args.pid
    else:
        log = Path(tempfile.gettempdir()) / f"soak-server-{os.getpid()}.log"  # (hours of INFO lines: not in --out)
        print(f"server log: {log}", flush=True)
        process, base = _start(args.serve_args, log)
        pid = process.pid
    try:
        run_async(wait_healthy(base, 900, (lambda: process.poll() is None) if process else None, args.api_key))
        rounds = max(args.warmup + 2, round(args.minutes * 60 / args.round_seconds))
        results = run_async(soak(base, pid, args.model, rounds=rounds, clients=args.clients,
                                 seconds=args.round_seconds, api_key=args.api_key, progress=True))
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    verdict = memory_growth(results, args.warmup)
    report = {"command": " ".join(sys.argv), "verdict": verdict, "wrong": sum(r.wrong for r in results),
              "rounds": [asdict(r) for r in results]}
    (args.out / "soak.json").write_text(json.dumps(report, indent=1))
    chart(results, args.warmup, args.out / "soak.png")
    print(json.dumps({**verdict, "wrong": report["wrong"]}, indent=1))
    print(f"written: {args.out}/soak.json, soak.png")
    return 0 if report["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
