"""Issue 15 part 3, as one prepared run for a GPU machine: the torch engine on CUDA next to sentence-transformers.

    python -m bench.studies.gpu_check --out DIR [--kit DIR] [--device cuda] [--dtype bfloat16] [--seconds 20]

(on the device machine: `PYTHONPATH=/tmp/site:src python3 -m bench.studies.gpu_check --out $OUT`, after installing the
carried wheels of fastapi, starlette, uvicorn, pydantic(-core, -settings), orjson and their needs into /tmp/site;
the device README says how; bench/studies/gpu_wheels.sh prepares both). It builds the full-size Qwen3 shape
(bench/make_model.py; with --kit, random weights for a carried model folder) unless --model-dir is given, then
measures:

1. vectors: the torch engine on `--device` in each of `--vector-dtypes` and sentence-transformers on the same
   device and dtype, each against the torch engine on the CPU in fp32 (cosine per text, min and mean; the goal
   is >= 0.999);
2. speed, in `--dtype`: texts/s of sentence-transformers' `encode` in-process (batches of 32, and one short text
   per call), and of our server (torch engine on the device; as it starts, then with batches up to 256) on
   `batch32` and `short-c64` through HTTP, with p50/p99 latencies.

Writes gpu_check.json and gpu_check.md to --out. Every step prints as it goes (the device returns the tail).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import inprocess
from ..loadgen import drive, run_async, wait_ready
from ..peers import PEERS, SERVED_NAME, Server
from ..workloads import TextMaker, select_workloads

# The server as it starts, with batches sized for a GPU (the defaults are sized for CPUs), and compiled.
_GPU_BATCHES = ["--max-batch-size", "256", "--max-batch-tokens", "65536"]
SERVER_VARIANTS = {"defaults": [], "batch256": _GPU_BATCHES, "compile": ["--torch-compile"],
                   "compile+batch256": ["--torch-compile", *_GPU_BATCHES]}


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _model_dir(args: argparse.Namespace) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    folder = Path(args.models_dir) / "qwen3-0.6b-random"
    if args.kit and not (folder / "model.safetensors").is_file():
        _say(f"random weights for the model folder {args.kit} (config and tokenizer) in {folder}")
        _weights_from_kit(Path(args.kit), folder)
    if not (folder / "config.json").is_file():
        _say(f"building the full-size Qwen3 shape in {args.models_dir}")
        subprocess.run([sys.executable, "-m", "bench.make_model", "--out", args.models_dir],
                       check=True, cwd=Path(__file__).parents[2])  # (a module from the root: it imports testkit)
    return folder


def _weights_from_kit(kit: Path, out: Path) -> None:
    """A model folder's files (config, tokenizer, sentence-transformers files) plus fresh random weights of
    its config's shape, as make_model.py draws them: the 4.5 MB kit travels to the device instead of 2.4 GB of
    weights, and the minute make_model.py spends training a tokenizer is not spent on device time."""
    import torch
    from transformers import AutoConfig, AutoModel

    shutil.copytree(kit, out, dirs_exist_ok=True)
    config = AutoConfig.from_pretrained(out)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # drawn on a GPU in a second
        model = AutoModel.from_config(config)
    with torch.no_grad():  # as build_random_qwen3: the pad row gets values like any other token
        model.get_input_embeddings().weight[config.pad_token_id].normal_(0.0, config.initializer_range)
    model.save_pretrained(out, safe_serialization=True)
    config.save_pretrained(out)


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


def _st_speed(model: Any, texts: list[str], seconds: float, batch_size: int) -> dict[str, float]:
    """texts/s of `encode` in this process, `batch_size` texts per call (1: what a server that calls it once per
    request gets from one client)."""
    model.encode(texts[:64], batch_size=batch_size)  # warm-up
    done, started = 0, time.perf_counter()
    per_call = max(batch_size, 256)
    while time.perf_counter() - started < seconds:
        start = done % len(texts)
        chunk = texts[start : start + per_call] or texts[:per_call]
        if batch_size == 1:
            for text in chunk[:16]:
                model.encode([text], batch_size=1, normalize_embeddings=True)
            chunk = chunk[:16]
        else:
            model.encode(chunk, batch_size=batch_size, normalize_embeddings=True)
        done += len(chunk)
    return {"texts_per_s": round(done / (time.perf_counter() - started), 1)}


def _spread(vectors: np.ndarray) -> float:
    """Mean cosine between different texts' vectors: near 1 would mean a random model that maps every text to
    the same vector, and a cosine-to-reference check on it would prove nothing."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    gram = unit @ unit.T
    n = len(unit)
    return round(float((gram.sum() - np.trace(gram)) / (n * (n - 1))), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="the speed runs' dtype")
    parser.add_argument("--vector-dtypes", default="bfloat16,float16", help="dtypes whose vectors are compared")
    parser.add_argument("--kit", default=None,
                        help="a model folder without weights (config, tokenizer): random weights are drawn for it")
    parser.add_argument("--model-dir", default=None, help="default: build the full-size Qwen3 shape")
    parser.add_argument("--models-dir", default="/tmp/bench-models")
    parser.add_argument("--texts", type=int, default=256, help="texts compared with the CPU fp32 reference")
    parser.add_argument("--seconds", type=float, default=20.0, help="per speed measurement")
    parser.add_argument("--variants", default=",".join(SERVER_VARIANTS),
                        help=f"server variants to run, from: {', '.join(SERVER_VARIANTS)}")
    parser.add_argument("--no-st", action="store_true",
                        help="skip the in-process torch engine and sentence-transformers steps (vectors and speed)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = _model_dir(args)
    maker = TextMaker(seed=31)
    texts = [t for request in maker.requests(select_workloads(["batch32"])[0], max(1, args.texts // 32))
             for t in request]
    report: dict[str, Any] = {"device": args.device, "gpu": _gpu_name(args.device), "dtype": args.dtype,
                              "model_dir": str(model_dir), "texts_compared": len(texts)}

    _say("vectors: CPU fp32 reference (torch engine)")
    reference = _torch_vectors(model_dir, texts, "cpu", "float32")
    report["reference_mean_cos_between_texts"] = _spread(reference)
    _say(f"  mean cosine between different texts: {report['reference_mean_cos_between_texts']}")
    report["cosine_to_cpu_fp32"] = {}
    if not args.no_st:
        _in_process(args, model_dir, maker, texts, reference, report)
    report["ours"] = {}
    _save(report, args.out)
    for variant in args.variants.split(","):
        report["ours"][variant] = _serve_and_drive(args, model_dir, maker, SERVER_VARIANTS[variant], texts,
                                                   reference)
        _save(report, args.out)

    (args.out / "gpu_check.md").write_text(_markdown(report))
    _say(f"written: {args.out}/gpu_check.json, gpu_check.md")
    return 0


def _in_process(args: argparse.Namespace, model_dir: Path, maker: TextMaker, texts: list[str],
                reference: np.ndarray, report: dict[str, Any]) -> None:
    """The torch engine in-process and sentence-transformers: vectors per dtype, then sentence-transformers'
    speed."""
    for dtype in args.vector_dtypes.split(","):
        _say(f"vectors: torch engine and sentence-transformers on {args.device} {dtype}")
        ours = _torch_vectors(model_dir, texts, args.device, dtype)
        st = _st_model(model_dir, args.device, dtype)
        st_vectors = np.asarray(st.encode(texts, batch_size=32, normalize_embeddings=True), dtype=np.float32)
        report["cosine_to_cpu_fp32"][dtype] = {
            "ours": _cosines(ours, reference), "sentence_transformers": _cosines(st_vectors, reference),
            "ours_vs_st": _cosines(ours, st_vectors)}
        _say(f"  {report['cosine_to_cpu_fp32'][dtype]}")
        del st

    st = _st_model(model_dir, args.device, args.dtype)
    for name, workload, batch_size in (("encode_b32", "batch32", 32), ("encode_single_short", "short-c64", 1)):
        _say(f"speed: sentence-transformers {name}")
        speed_texts = [t for r in maker.requests(select_workloads([workload])[0], 4096 // batch_size, salt=1)
                       for t in r]
        report[f"sentence_transformers_{name}"] = _st_speed(st, speed_texts, args.seconds, batch_size)
        _say(f"  {report[f'sentence_transformers_{name}']}")
    del st


def _save(report: dict[str, Any], out: Path) -> None:
    """After each stage, so that a run stopped at its time limit still brings back what it measured."""
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))


def _gpu_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "none"


def _server_vectors(url: str, texts: list[str]) -> np.ndarray:
    import httpx

    rows = []
    for start in range(0, len(texts), 32):
        reply = httpx.post(url, json={"model": SERVED_NAME, "input": texts[start : start + 32]}, timeout=120)
        reply.raise_for_status()
        rows += [item["embedding"] for item in reply.json()["data"]]
    return np.asarray(rows, dtype=np.float32)


def _serve_and_drive(args: argparse.Namespace, model_dir: Path, maker: TextMaker, flags: list[str],
                     texts: list[str], reference: np.ndarray) -> dict[str, Any]:
    server = Server(PEERS["ours-torch"], str(model_dir), str(model_dir), threads=len(os.sched_getaffinity(0)),
                    dtype=args.dtype,
                    log_dir=args.out, max_model_len=3072, extra_args=["--device", args.device, *flags])
    results: dict[str, Any] = {}
    server.start()
    try:
        run_async(wait_ready(server.url, model=SERVED_NAME, timeout_s=600, alive=server.alive))
        results["ready_after_s"] = round(time.perf_counter() - server.started_at, 1)
        results["vectors_vs_cpu_fp32"] = _cosines(_server_vectors(server.url, texts), reference)
        _say(f"ours ({' '.join(flags) or 'defaults'}) ready after {results['ready_after_s']} s; vectors vs CPU fp32: "
             f"{results['vectors_vs_cpu_fp32']}")
        for workload in select_workloads(["batch32", "short-c64"]):
            requests = maker.requests(workload, 20_000 // workload.per_request, salt=2)
            run_async(drive(server.url, requests[:200], concurrency=workload.concurrency, duration_s=5,
                            model=SERVED_NAME))  # warm-up
            result = run_async(drive(server.url, requests[200:], concurrency=workload.concurrency,
                                     duration_s=args.seconds, model=SERVED_NAME))
            summary = result.summary()
            results[workload.name] = {k: summary[k] for k in ("texts_per_s", "p50_ms", "p99_ms", "errors")}
            _say(f"ours ({' '.join(flags) or 'defaults'}) {workload.name}: {results[workload.name]}")
    finally:
        server.stop()
    return results


def _markdown(report: dict[str, Any]) -> str:
    title = f"torch engine on {report['device']} ({report['gpu']}), {Path(report['model_dir']).name}"
    lines = [f"# GPU check: {title}", "",
             f"{report['texts_compared']} texts; mean cosine between different texts' reference vectors: "
             f"{report['reference_mean_cos_between_texts']}", "",
             "| dtype | vectors vs CPU fp32 | min cos | mean cos |", "|---|---|---|---|"]
    lines += [f"| {dtype} | {name} | {c['min']} | {c['mean']} |"
              for dtype, by_name in report["cosine_to_cpu_fp32"].items() for name, c in by_name.items()]
    lines += ["", f"Speed in {report['dtype']}:", "", "| workload | texts/s | p50 ms | p99 ms |", "|---|---|---|---|"]
    for key, what in (("encode_b32", "batches of 32"), ("encode_single_short", "one short text per call")):
        if f"sentence_transformers_{key}" in report:
            lines.append(f"| sentence-transformers encode, {what} (in-process) | "
                         f"{report[f'sentence_transformers_{key}']['texts_per_s']} | – | – |")
    lines += [f"| ours ({variant}) {name} | {r['texts_per_s']} | {r['p50_ms']} | {r['p99_ms']} |"
              for variant, by_workload in report["ours"].items() for name, r in by_workload.items()
              if isinstance(r, dict) and "texts_per_s" in r]
    lines += ["", "| server variant | ready after s | vectors vs CPU fp32: min / mean cos |", "|---|---|---|"]
    lines += [f"| {variant} | {r.get('ready_after_s')} | {r['vectors_vs_cpu_fp32']['min']} / "
              f"{r['vectors_vs_cpu_fp32']['mean']} |" for variant, r in report["ours"].items()
              if "vectors_vs_cpu_fp32" in r]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
