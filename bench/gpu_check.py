"""Issue 15 part 3, as one prepared run for a GPU machine: the torch engine on CUDA next to sentence-transformers.

    python -m bench.gpu_check --out DIR [--device cuda] [--dtype bfloat16] [--seconds 20]

(on the device machine: `PYTHONPATH=/tmp/site:src python3 -m bench.gpu_check --out $OUT`, after installing the
carried wheels of fastapi, starlette, uvicorn, pydantic(-core, -settings), orjson and their needs into /tmp/site;
the device README says how.) It builds the full-size Qwen3 shape (bench/make_model.py) unless --model-dir is
given, then measures:

1. vectors: the torch engine on `--device`/`--dtype` and sentence-transformers on the same device and dtype,
   each against the torch engine on the CPU in fp32 (cosine per text, min and mean; the goal is >= 0.999);
2. speed: texts/s of sentence-transformers' `encode` in-process (batches of 32), and of our server (torch
   engine on the device) on `batch32` and `short-c64` through HTTP, with p50/p99 latencies.

Writes gpu_check.json and gpu_check.md to --out. Every step prints as it goes (the device returns the tail).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import inprocess
from .loadgen import drive, run_async, wait_ready
from .peers import PEERS, SERVED_NAME, Server
from .workloads import TextMaker, select_workloads


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _model_dir(args: argparse.Namespace) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    folder = Path(args.models_dir) / "qwen3-0.6b-random"
    if not (folder / "config.json").is_file():
        _say(f"building the full-size Qwen3 shape in {args.models_dir}")
        subprocess.run([sys.executable, str(Path(__file__).with_name("make_model.py")), "--out", args.models_dir],
                       check=True)
    return folder


def _torch_vectors(model_dir: Path, texts: list[str], device: str, dtype: str) -> np.ndarray:
    backend = inprocess._build({"engine": "torch", "model_dir": str(model_dir), "device": device, "dtype": dtype,
                                "max_batch_size": 32})
    backend.load()
    try:
        return np.concatenate([backend.embed(backend.tokenize(texts[i : i + 32])) for i in range(0, len(texts), 32)])
    finally:
        backend.close()


def _cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = (a * b).sum(axis=1)
    return {"min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6)}


def _st_model(model_dir: Path, device: str, dtype: str) -> Any:
    import torch
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device=device, model_kwargs={"dtype": getattr(torch, dtype)})


def _st_speed(model: Any, texts: list[str], seconds: float) -> dict[str, float]:
    model.encode(texts[:64], batch_size=32)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        chunk = texts[done % len(texts) : done % len(texts) + 256] or texts[:256]
        model.encode(chunk, batch_size=32, normalize_embeddings=True)
        done += len(chunk)
    return {"texts_per_s": round(done / (time.perf_counter() - started), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--model-dir", default=None, help="default: build the full-size Qwen3 shape")
    parser.add_argument("--models-dir", default="/tmp/bench-models")
    parser.add_argument("--texts", type=int, default=256, help="texts compared with the CPU fp32 reference")
    parser.add_argument("--seconds", type=float, default=20.0, help="per speed measurement")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = _model_dir(args)
    maker = TextMaker(seed=31)
    texts = [t for request in maker.requests(select_workloads(["batch32"])[0], max(1, args.texts // 32))
             for t in request]
    report: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "model_dir": str(model_dir),
                              "texts_compared": len(texts)}

    _say("vectors: CPU fp32 reference (torch engine)")
    reference = _torch_vectors(model_dir, texts, "cpu", "float32")
    _say(f"vectors: torch engine on {args.device} {args.dtype}")
    ours = _torch_vectors(model_dir, texts, args.device, args.dtype)
    st = _st_model(model_dir, args.device, args.dtype)
    st_vectors = np.asarray(st.encode(texts, batch_size=32, normalize_embeddings=True), dtype=np.float32)
    report["cosine_to_cpu_fp32"] = {"ours": _cosines(ours, reference), "sentence_transformers":
                                    _cosines(st_vectors, reference), "ours_vs_st": _cosines(ours, st_vectors)}
    _say(f"cosines: {report['cosine_to_cpu_fp32']}")

    _say("speed: sentence-transformers encode, batches of 32")
    speed_texts = [t for r in maker.requests(select_workloads(["batch32"])[0], 128, salt=1) for t in r]
    report["sentence_transformers_encode_b32"] = _st_speed(st, speed_texts, args.seconds)
    _say(f"  {report['sentence_transformers_encode_b32']}")
    del st
    report["ours"] = _serve_and_drive(args, model_dir, maker)

    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu_check.md").write_text(_markdown(report))
    _say(f"written: {args.out}/gpu_check.json, gpu_check.md")
    return 0


def _serve_and_drive(args: argparse.Namespace, model_dir: Path, maker: TextMaker) -> dict[str, Any]:
    server = Server(PEERS["ours-torch"], str(model_dir), str(model_dir), threads=len(os.sched_getaffinity(0)),
                    dtype=args.dtype,
                    log_dir=args.out, max_model_len=3072, extra_args=["--device", args.device])
    results: dict[str, Any] = {}
    server.start()
    try:
        run_async(wait_ready(server.url, model=SERVED_NAME, timeout_s=600, alive=server.alive))
        for workload in select_workloads(["batch32", "short-c64"]):
            requests = maker.requests(workload, 20_000 // workload.per_request, salt=2)
            run_async(drive(server.url, requests[:200], concurrency=workload.concurrency, duration_s=5,
                            model=SERVED_NAME))  # warm-up
            result = run_async(drive(server.url, requests[200:], concurrency=workload.concurrency,
                                     duration_s=args.seconds, model=SERVED_NAME))
            summary = result.summary()
            results[workload.name] = {k: summary[k] for k in ("texts_per_s", "p50_ms", "p99_ms", "errors")}
            _say(f"ours {workload.name}: {results[workload.name]}")
    finally:
        server.stop()
    return results


def _markdown(report: dict[str, Any]) -> str:
    cos = report["cosine_to_cpu_fp32"]
    title = f"torch engine on {report['device']} ({report['dtype']}), {Path(report['model_dir']).name}"
    lines = [f"# GPU check: {title}", "",
             "| vectors vs CPU fp32 | min cos | mean cos |", "|---|---|---|"]
    lines += [f"| {name} | {c['min']} | {c['mean']} |" for name, c in cos.items()]
    lines += ["", "| workload | texts/s | p50 ms | p99 ms |", "|---|---|---|---|",
              f"| sentence-transformers encode, batches of 32 | "
              f"{report['sentence_transformers_encode_b32']['texts_per_s']} | – | – |"]
    lines += [f"| ours {name} | {r['texts_per_s']} | {r['p50_ms']} | {r['p99_ms']} |"
              for name, r in report["ours"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
