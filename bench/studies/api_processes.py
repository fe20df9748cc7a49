"""`--api-processes N` side by side: one server per setting, alternating rounds (A B A B ...), wrk as the client.

    PYTHONPATH=src python -m bench.studies.api_processes --processes 1,2 --rounds 3 --duration 10 --concurrency 64
    PYTHONPATH=src python -m bench.studies.api_processes --engine torch --model-path DIR --concurrency 16

Each round starts a fresh server for each setting (bench/peers.py, from the `embedding_service` on PYTHONPATH),
waits until every API process answers, warms it, sends single-text requests (distinct ~15-token texts) from
wrk for `--duration` seconds (counting, halfway, the connections each process holds), and reads the CPU
seconds of the server's whole process tree (engine process and API processes) before and after: requests/s
and server CPU ms per request. Prints one JSON line per run and a summary (median per setting; the median and
range of the per-round ratio to the first setting).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

from bench.peers import Peer, Server
from bench.workloads import TextMaker, select_workloads
from bench.wrk_client import drive_wrk


def _server(args: argparse.Namespace, processes: int) -> Server:
    engine = args.engine
    peer = Peer(f"ours-{engine}-api{processes}", "ours", engine, 300,
                flags=("--api-processes", str(processes), "--log-level", "WARNING", "--max-queue-requests", "100000",
                       *args.server_args.split()))
    return Server(peer, model_dir=args.model_path or "", st_model_dir="", threads=os.cpu_count() or 1,
                  dtype=args.dtype, log_dir=Path(args.log_dir), max_model_len=512)


def wait_every_process_ready(url: str, alive: Callable[[], bool] = lambda: True, timeout: float = 180.0,
                             streak: int = 20) -> None:
    """Until `streak` probes of /health in a row, each on a new connection (so any API process may take it),
    answer 200; RuntimeError when `alive()` turns false or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    good = 0
    while good < streak:
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"not every process of {url} became ready")
        try:
            good = good + 1 if httpx.get(url + "/health", timeout=5).status_code == 200 else 0
        except httpx.HTTPError:
            good = 0
        if not good:
            time.sleep(0.2)


def established_connections(proc: psutil.Process, port: int) -> int:
    """How many established TCP connections `proc` holds on its local `port`."""
    return sum(1 for c in proc.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


def _connections_held(server: psutil.Process, url: str) -> list[int]:
    """Established connections on the server's port, per process of its tree that holds any, fewest first."""
    port = urlsplit(url).port
    assert port is not None
    counts = []
    for proc in [server, *server.children(recursive=True)]:
        try:
            mine = established_connections(proc, port)
        except psutil.Error:
            continue
        if mine:
            counts.append(mine)
    return sorted(counts)


def _run_one(args: argparse.Namespace, processes: int, round_no: int, maker: TextMaker) -> dict[str, float]:
    server = _server(args, processes)
    server.start()
    try:
        url = server.url
        try:
            wait_every_process_ready(url.removesuffix("/v1/embeddings"), server.alive)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {server.log_tail()}") from None
        short = select_workloads(["short-c1"])[0]
        warm = maker.requests(short, 2000, salt=-1 - round_no)
        asyncio.run(drive_wrk(url, warm, concurrency=args.concurrency, duration_s=2))
        requests = maker.requests(short, int(args.duration * 8000), salt=round_no * 10 + processes)
        assert server.process is not None
        engine_process = psutil.Process(server.process.pid)  # (with N=1, the whole server)
        before, before_engine = server.cpu_seconds() or 0.0, sum(engine_process.cpu_times()[:2])
        held: list[int] = []  # connections each API process holds, halfway through the run
        probe = threading.Timer(args.duration / 2, lambda: held.extend(_connections_held(engine_process, url)))
        probe.start()
        result = asyncio.run(drive_wrk(url, requests, concurrency=args.concurrency, duration_s=args.duration))
        probe.join()
        cpu = (server.cpu_seconds() or 0.0) - before
        engine_cpu = sum(engine_process.cpu_times()[:2]) - before_engine
    finally:
        server.stop()
    row = {"round": round_no, "api_processes": processes, "requests": result.requests, "errors": result.errors,
           "requests_per_s": round(result.requests / max(result.wall_s, 1e-9), 1),
           "server_cpu_ms_per_request": round(1000 * cpu / max(result.requests, 1), 3),
           "engine_process_cpu_ms_per_request": round(1000 * engine_cpu / max(result.requests, 1), 3),
           "client_cpu_ms_per_request": round(1000 * result.client_cpu_s / max(result.requests, 1), 3),
           "connections_held": held,
           "p50_ms": round(result.percentiles_ms[0], 2) if result.percentiles_ms else None,
           "p99_ms": round(result.percentiles_ms[2], 2) if result.percentiles_ms else None}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2", help="comma list of --api-processes values")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--engine", default="fake")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--server-args", default="")
    parser.add_argument("--log-dir", default="/tmp/bench-api-processes")
    args = parser.parse_args(argv)
    settings = [int(n) for n in args.processes.split(",")]
    maker = TextMaker(seed=1234)
    rows = [_run_one(args, n, r, maker) for r in range(args.rounds) for n in settings]
    summary: dict[str, object] = {}
    for n in settings:
        mine = [row for row in rows if row["api_processes"] == n]
        summary[f"N={n}"] = {"requests_per_s": statistics.median(r["requests_per_s"] for r in mine),
                             "server_cpu_ms_per_request": statistics.median(r["server_cpu_ms_per_request"]
                                                                            for r in mine),
                             "errors": sum(r["errors"] for r in mine)}
    base = settings[0]
    for n in settings[1:]:
        ratios = [next(r for r in rows if r["round"] == k and r["api_processes"] == n)["requests_per_s"]
                  / next(r for r in rows if r["round"] == k and r["api_processes"] == base)["requests_per_s"]
                  for k in range(args.rounds)]
        summary[f"N={n} / N={base}"] = {"median": round(statistics.median(ratios), 3),
                                        "range": [round(min(ratios), 3), round(max(ratios), 3)]}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
