"""Measuring one target: an HTTP server (ours or a peer) or an in-process ceiling run in a subprocess."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.loadgen import drive, run_async, wait_ready
from bench.peers import PEERS, SERVED_NAME, Server
from bench.workloads import TextMaker, Workload, as_sent

__all__ = ["inprocess", "max_len", "measure_url", "run_servers", "text_maker"]

ROOT = Path(__file__).resolve().parents[1]
# Texts generated per workload (more than any run sends within its duration on a small machine).
TEXT_BUDGET = {"short": 40_000, "long": 1_200, "mixed": 12_000}


def max_len(model_dir: str, cap: int = 3072) -> int:
    """The window every peer can serve: config positions, and sentence-transformers' max_seq_length (vLLM
    refuses more than that; MiniLM reads 256 tokens although its position table has 512)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    limit = min(cap, int(cfg.get("max_position_embeddings") or cap))
    st_path = Path(model_dir) / "sentence_bert_config.json"
    if st_path.is_file():
        limit = min(limit, int(json.loads(st_path.read_text()).get("max_seq_length") or limit))
    return limit


def text_maker(model_dir: str | None, seed: int) -> TextMaker:
    maker = TextMaker(seed)
    if model_dir and Path(model_dir, "config.json").is_file():
        # ~500-token texts, but inside the model's window even at +15% (MiniLM reads 512 tokens at most).
        maker.TARGETS = {**maker.TARGETS, "long": min(500, int(max_len(model_dir) * 0.8))}
    tok_file = Path(model_dir) / "tokenizer.json" if model_dir else None
    if tok_file is not None and tok_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok_file))
        tokenizer.no_truncation()  # MiniLM's tokenizer.json truncates at 128: count the real length
        tokenizer.no_padding()
        maker.calibrate(lambda texts: [len(e.ids) for e in tokenizer.encode_batch(texts)])
    return maker


def _requests(maker: TextMaker, work: Workload, salt: int = 0) -> list[list[str]]:
    budget = TEXT_BUDGET[work.kind]
    per = (work.per_request + 1) // 2 if work.mixed_batch else work.per_request
    return maker.requests(work, max(4 * work.concurrency, budget // per), salt)


def _warmup(maker: TextMaker, work: Workload) -> list[list[str]]:
    return maker.requests(work, min(work.concurrency * 2, 8) if work.per_request == 1 else 1, salt=1)


async def measure_url(
    url: str,
    model: str | None,
    works: list[Workload],
    maker: TextMaker,
    duration: float,
    server: Server | None,
    tag: dict[str, Any],
    server_formats: bool = False,
    client: str = "aiohttp",
) -> list[dict[str, Any]]:
    """`server_formats`: the server takes Qwen3's `instruction` field (ours); else queries go formatted.
    `client`: the load generator, aiohttp (bench/loadgen.py) or wrk (bench/wrk_client.py)."""
    rows = []
    sender = drive
    if client == "wrk":
        from bench.wrk_client import drive_wrk

        sender = drive_wrk
    for work in works:

        async def send(requests: list[list[str]], work: Workload = work) -> Any:
            texts, instruction = as_sent(requests, work.instruction, server_formats)
            return await sender(url, texts, concurrency=work.concurrency, duration_s=duration, model=model,
                                encoding=work.encoding, instruction=instruction)

        await send(_warmup(maker, work))
        cpu0 = server.cpu_seconds() if server else None
        res = await send(_requests(maker, work))
        cpu1 = server.cpu_seconds() if server else None
        if cpu0 is not None and cpu1 is not None:
            res.server_cpu_s = cpu1 - cpu0
        summary = res.summary()
        rows.append({**tag, "workload": work.name, **summary})
        print(
            f"  {tag['target']:<20} {work.name:<14} {summary['texts_per_s']:>9.1f} texts/s  "
            f"p50 {summary['p50_ms']:>8.1f} ms  p99 {summary['p99_ms']:>8.1f} ms  "
            f"errors {summary['errors']}  "
            f"client CPU {summary['client_cpu_pct']:.0f}%",
            flush=True,
        )
    return rows


def inprocess(
    engine: str,
    model: dict[str, Any],
    works: list[Workload],
    maker: TextMaker,
    args: argparse.Namespace,
    out_dir: Path,
) -> list[dict[str, Any]]:
    spec = {
        "engine": engine,
        "model_dir": model["dir"],
        "dtype": args.dtype,
        "duration_s": args.duration,
        "max_batch_size": 32,
        "max_model_len": max_len(model["dir"]),
        "modes": ["engine", "raw"],
        "workloads": [
            {"workload": w.describe(), "requests": _requests(maker, w), "warmup": _warmup(maker, w)} for w in works
        ],
    }
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.threads),
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
            "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", "/tmp/bench-vllm-cache"),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        if engine != "vllm-offline":  # our engine: OpenMP waits as `serve` sets them (vLLM's own: its defaults)
            from embedding_service.service import openmp_waits_for

            env.update(openmp_waits_for([engine], env))
        module = "bench.vllm_offline" if engine == "vllm-offline" else "bench.inprocess"
        with open(out_dir / f"inproc-{engine}-{model['name']}.log", "ab") as log:
            proc = subprocess.run(
                [sys.executable, "-m", module, str(spec_path), str(out_path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=3600,
            )
        rows = json.loads(out_path.read_text()) if out_path.is_file() else []
        if proc.returncode != 0 and not rows:
            raise RuntimeError(
                f"in-process {engine} failed (exit {proc.returncode}); see "
                f"{out_dir}/inproc-{engine}-{model['name']}.log"
            )
        for row in rows:
            print(f"  {row['target']:<20} {row['workload']:<14} {row['texts_per_s']:>9.1f} texts/s", flush=True)
    return [{"model": model["name"], **row} for row in rows]


def run_servers(
    names: list[str],
    model: dict[str, Any],
    works: list[Workload],
    maker: TextMaker,
    args: argparse.Namespace,
    out_dir: Path,
    result: dict[str, Any],
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in names:
        if name not in PEERS:
            raise SystemExit(f"unknown target {name!r}; choose from inproc, {', '.join(PEERS)}")
        window = max_len(model["dir"]) if Path(model["dir"], "config.json").is_file() else 512
        server = Server(
            PEERS[name],
            model["dir"],
            model.get("st_dir", model["dir"]),
            args.threads,
            args.dtype,
            out_dir / f"logs-{model['name']}",
            window,
            infinity_venv=args.infinity_venv,
            extra_args=shlex.split(args.server_args) if PEERS[name].kind == "ours" else [],
        )
        try:
            server.start()
            run_async(
                wait_ready(server.url, model=SERVED_NAME, timeout_s=PEERS[name].ready_timeout_s, alive=server.alive)
            )
            load_s = time.perf_counter() - server.started_at
            print(f"  {name} ready in {load_s:.0f}s on port {server.port}", flush=True)
            tag = {"model": model["name"], "target": name, "load_s": round(load_s, 1)}
            rows += run_async(measure_url(server.url, SERVED_NAME, works, maker, args.duration, server, tag,
                                            server_formats=PEERS[name].kind in ("ours", "bare"), client=args.client))
        except Exception as exc:
            reason = f"{model['name']}: {name}: {type(exc).__name__}: {exc}"
            last = server.log_tail(1).strip()
            result["skipped"].append(f"{reason} — server log: {last[:300]}" if last else reason)
            print(f"  skipped {reason}\n{server.log_tail()}", flush=True)
        finally:
            server.stop()
    return rows
