"""The exact result cache (docs/cache.md) on a re-indexing workload: a corpus indexed once, then indexed
again with 0%, 50% or 100% of its documents unchanged, against a server with the cache (the default) and one
with `--result-cache-bytes 0`, side by side, in alternating rounds.

    python -m bench.studies.result_cache                                   # MiniLM (demo), torch engine, fp32
    python -m bench.studies.result_cache --docs 256 --rounds 3 --repeats 0,50,100 -- --demo --engine torch
    python -m bench.studies.result_cache --overhead      # the cache's own CPU cost per document, in-process

Both servers run at once (each started once; only one is driven at a time). Each round and share, for each
server in turn (the order alternates by round): index a fresh corpus of `--docs` documents (not timed: it
fills the cache; skipped for the uncached server, which keeps no state), then time re-indexing a corpus of
the same size where `share`% of the documents are from the first and the rest new, in requests of `--batch`
documents, `--concurrency` in flight, base64 vectors (what a bulk client asks for). Every round draws fresh
documents, so no round finds an earlier round's entries. Reports documents/s per server and share, and the
ratio cached / uncached: the median over rounds and the range of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..loadgen import drive, run_async, wait_ready
from ..peers import free_port
from ..workloads import _WORDS

__all__ = ["main"]

DEFAULT_SERVER = ["--demo", "--engine", "torch", "--dtype", "float32"]


def _documents(rng: random.Random, count: int, words: tuple[int, int]) -> list[str]:
    # A serial first: every document distinct, even if two word draws collide.
    return [f"{rng.randrange(10**12)} " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*words)))
            for _ in range(count)]


def _start(name: str, args: list[str], src: Path, log_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(src)}
    log = (log_dir / f"{name}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "embedding_service", "serve", "--host", "127.0.0.1", "--port",
                             str(port), *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    return proc, f"http://127.0.0.1:{port}/v1/embeddings"


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the server process has used so far: its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _index(url: str, docs: list[str], batch: int, concurrency: int, pid: int) -> tuple[float, float]:
    """Documents/s of sending `docs` in requests of `batch`, and the server's CPU ms per document (steadier
    than wall time on a shared machine); raises if any request failed."""
    requests = [docs[i:i + batch] for i in range(0, len(docs), batch)]
    cpu = _cpu_s(pid)
    result = run_async(drive(url, requests, concurrency=concurrency, duration_s=3600, encoding="base64"))
    cpu = _cpu_s(pid) - cpu
    if result.errors or result.texts != len(docs):
        raise RuntimeError(f"{result.errors} failed requests: {result.error_samples}")
    return result.texts / result.wall_s, cpu * 1000 / len(docs)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    server = argv[argv.index("--") + 1:] if "--" in argv else list(DEFAULT_SERVER)
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m bench.studies.result_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=256, help="documents per corpus")
    parser.add_argument("--words", default="40,100", help="words per document, min,max (MiniLM: ~1.3 tokens a word)")
    parser.add_argument("--repeats", default="0,50,100", help="percent of unchanged documents, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="documents per request")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[2] / "src")
    parser.add_argument("--overhead", action="store_true", help="only measure the cache's own cost per document "
                        "(through_cache over a free engine, all misses then all hits), in-process")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/<time>-cache.json)")
    return parser.parse_args(argv), server


def overhead(docs: int = 9600, batch: int = 32, tokens: int = 120, dimension: int = 384) -> dict[str, float]:
    """µs per document that the cache adds on a miss (key, lookup, store, assembling the answer) and costs
    on a hit, against handing the same sequences to a submit that costs nothing."""
    import asyncio

    import numpy as np

    from embedding_service.engine.cached import through_cache
    from embedding_service.engine.result_cache import ResultCache

    rng = random.Random(0)
    batches = [[[rng.randrange(30000) for _ in range(tokens)] for _ in range(batch)] for _ in range(docs // batch)]
    rows = np.random.default_rng(0).standard_normal((batch, dimension)).astype(np.float32)

    async def submit(seqs: Any) -> tuple[Any, float, float]:
        return rows[:len(seqs)], 0.0, 0.0

    async def timed(use_cache: bool) -> float:
        started = time.process_time()
        for seqs in batches:
            await (through_cache(cache, seqs, submit) if use_cache else submit(seqs))
        return (time.process_time() - started) * 1e6 / docs

    cache = ResultCache(1 << 30).for_model("bench")
    cache._namespace = b"bench".ljust(16)
    bare = asyncio.run(timed(False))
    return {"miss_us_per_doc": asyncio.run(timed(True)) - bare, "hit_us_per_doc": asyncio.run(timed(True)) - bare}


def main(argv: list[str] | None = None) -> int:
    args, server = parse_args(argv)
    if args.overhead:
        print(json.dumps(overhead()))
        return 0
    low, high = (int(x) for x in args.words.split(","))
    shares = [int(x) for x in args.repeats.split(",")]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(__file__).parents[1] / "results" / f"{stamp}-cache.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    targets = {"cached": server, "uncached": [*server, "--result-cache-bytes", "0"]}
    procs = {name: _start(name, flags, args.src, out.parent) for name, flags in targets.items()}
    rows: list[dict[str, Any]] = []
    try:
        for proc, url in procs.values():
            run_async(wait_ready(url, model=None, timeout_s=600, alive=lambda p=proc: p.poll() is None))
            _index(url, _documents(random.Random(-1), 64, (low, high)), args.batch, args.concurrency, proc.pid)
        for round_no in range(args.rounds):
            order = list(procs) if round_no % 2 == 0 else list(reversed(procs))
            for share in shares:
                for name in order:
                    rng = random.Random(f"{round_no}/{share}/{name}")
                    first = _documents(rng, args.docs, (low, high))
                    kept = round(args.docs * share / 100)
                    second = rng.sample(first, kept) + _documents(rng, args.docs - kept, (low, high))
                    rng.shuffle(second)
                    proc, url = procs[name]
                    if name == "cached":  # the first indexing fills its cache (the other keeps no state)
                        _index(url, first, args.batch, args.concurrency, proc.pid)
                    rate, cpu_ms = _index(url, second, args.batch, args.concurrency, proc.pid)
                    rows.append({"round": round_no, "share": share, "server": name, "docs_per_s": rate,
                                 "server_cpu_ms_per_doc": cpu_ms})
                    print(f"round {round_no} repeats {share:3d}% {name:8s} {rate:9.1f} docs/s "
                          f"{cpu_ms:8.2f} server CPU ms/doc", flush=True)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(60)
    table = _table(rows, shares, args.rounds)
    out.write_text(json.dumps({"args": {**vars(args), "src": str(args.src), "out": str(out)}, "server": server,
                               "rows": rows, "table": table}, indent=1))
    print(table)
    print(f"results: {out}")
    return 0


def _table(rows: list[dict[str, Any]], shares: list[int], rounds: int) -> str:
    lines = ["| repeats | docs/s cached, uncached | docs/s ratio: median (range) | server CPU ms/doc cached, "
             "uncached | CPU ratio uncached / cached: median (range) |", "|---|---|---|---|---|"]
    for share in shares:
        cells = []
        for metric, better_high in (("docs_per_s", True), ("server_cpu_ms_per_doc", False)):
            value = {(r["server"], r["round"]): r[metric] for r in rows if r["share"] == share}
            ratios = [value["cached", n] / value["uncached", n] for n in range(rounds)]
            ratios = ratios if better_high else [1 / r for r in ratios]  # > 1: the cache is better
            cached = statistics.median(value["cached", n] for n in range(rounds))
            uncached = statistics.median(value["uncached", n] for n in range(rounds))
            cells += [f"{cached:.2f}, {uncached:.2f}",
                      f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"]
        lines.append(f"| {share}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
