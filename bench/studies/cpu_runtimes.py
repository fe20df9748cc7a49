"""CPU runtimes side by side in one process: torch, vLLM (offline engine), OpenVINO and ONNX Runtime, fp32/int8.

    python -m bench.studies.cpu_runtimes [--model-dir DIR] [--threads 2] [--duration 2] [--rounds 3] [--out FILE.json]

Every candidate gets the same pre-tokenised, distinct texts (tokenisation is not timed), the same thread count,
and runs once per round, rounds interleaved, so machine noise falls on all alike; report the per-round ratios to
torch fp32 and their median. Accuracy: cosine of each candidate's vectors to torch fp32 over 1,000 texts.
Exports (OpenVINO IR, ONNX, their int8 versions) go to a temporary folder and are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.workloads import TextMaker, Workload

Embed = Callable[[Sequence[Sequence[int]]], np.ndarray]

# (name, texts kind, batch size): batch-1 is a lone request, batch-16 what 16 single-text clients become
# after our batcher, batch-32 a client-side batch, long-b8 the compute-bound case.
CASES = (("single", "short", 1), ("batch16", "short", 16), ("batch32", "short", 32), ("long-b8", "long", 8))


def _pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    longest = max(len(s) for s in batch)
    ids = np.full((len(batch), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), longest), dtype=np.int64)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


def _mean_pool_norm(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden.astype(np.float32) * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def build_candidates(model_dir: str, threads: int, work: Path, calib: list[list[int]],
                     only: set[str] | None) -> dict[str, Embed]:
    import torch
    from transformers import AutoModel

    torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: dict[str, Embed] = {}

    def want(name: str) -> bool:
        return only is None or name in only

    def torch_embed(batch: Sequence[Sequence[int]]) -> np.ndarray:
        ids, mask = _pad(batch, 0)
        with torch.inference_mode():
            hidden = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        return _mean_pool_norm(hidden.numpy(), mask)

    out["torch-fp32"] = torch_embed

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    example = tuple(torch.from_numpy(a) for a in _pad(calib[:4], 0))
    if any(want(n) for n in ("ov-fp32", "ov-int8-wo", "ov-int8-wo-dq", "ov-int8-static")):
        import nncf
        import openvino as ov

        core = ov.Core()
        ov_model = ov.convert_model(Wrapper(), example_input=example)
        ov_model.reshape({0: ov.PartialShape([-1, -1]), 1: ov.PartialShape([-1, -1])})
        fp32_cfg = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
                    "PERFORMANCE_HINT": "LATENCY"}

        def ov_embed(compiled: Any) -> Embed:
            request = compiled.create_infer_request()

            def run(batch: Sequence[Sequence[int]]) -> np.ndarray:
                ids, mask = _pad(batch, 0)
                hidden = request.infer({0: ids, 1: mask})[0]
                return _mean_pool_norm(hidden, mask)

            return run

        if want("ov-fp32"):
            out["ov-fp32"] = ov_embed(core.compile_model(ov_model.clone(), "CPU", fp32_cfg))
        if want("ov-int8-wo") or want("ov-int8-wo-dq"):
            wo = nncf.compress_weights(ov_model.clone(), mode=nncf.CompressWeightsMode.INT8_ASYM)
            if want("ov-int8-wo"):
                out["ov-int8-wo"] = ov_embed(core.compile_model(wo, "CPU",
                                                                {**fp32_cfg, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}))
            if want("ov-int8-wo-dq"):  # weights int8, activations quantised per 32-group at run time
                out["ov-int8-wo-dq"] = ov_embed(core.compile_model(
                    wo, "CPU", {**fp32_cfg, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 32}))
        if want("ov-int8-static"):
            data = [dict(zip((0, 1), _pad(calib[i : i + 8], 0), strict=True)) for i in range(0, len(calib), 8)]
            q = nncf.quantize(ov_model.clone(), nncf.Dataset(data), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(data))
            out["ov-int8-static"] = ov_embed(core.compile_model(q, "CPU", fp32_cfg))
    if want("ort-fp32") or want("ort-int8-dyn"):
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        onnx_path = work / "model.onnx"
        batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("seq")
        torch.onnx.export(Wrapper(), example, str(onnx_path), input_names=["input_ids", "attention_mask"],
                          output_names=["hidden"], dynamo=True, external_data=False,
                          dynamic_shapes=({0: batch_dim, 1: seq_dim}, {0: batch_dim, 1: seq_dim}))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

        def ort_embed(path: Path) -> Embed:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

            def run(batch: Sequence[Sequence[int]]) -> np.ndarray:
                ids, mask = _pad(batch, 0)
                hidden = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
                return _mean_pool_norm(hidden, mask)

            return run

        if want("ort-fp32"):
            out["ort-fp32"] = ort_embed(onnx_path)
        if want("ort-int8-dyn"):
            q_path = work / "model.int8.onnx"
            quantize_dynamic(str(onnx_path), str(q_path), weight_type=QuantType.QInt8)
            out["ort-int8-dyn"] = ort_embed(q_path)
    if want("vllm-fp32"):
        out["vllm-fp32"] = _vllm_candidate(model_dir, threads)
    return out


def _vllm_candidate(model_dir: str, threads: int) -> Embed:
    if threads < len(os.sched_getaffinity(0)):  # vLLM binds one OpenMP thread per listed core
        cores = sorted(os.sched_getaffinity(0))[:threads]
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, TokensPrompt

    affinity = os.sched_getaffinity(0)
    llm = LLM(model=model_dir, runner="pooling", dtype="float32", max_model_len=256, enable_prefix_caching=False,
              seed=0, disable_log_stats=True)
    if os.sched_getaffinity(0) != affinity:  # vLLM pins this thread; give the other runtimes the cores back
        os.sched_setaffinity(0, affinity)

    def run(batch: Sequence[Sequence[int]]) -> np.ndarray:
        outs = llm.embed([TokensPrompt(prompt_token_ids=list(s)) for s in batch], use_tqdm=False)
        return np.stack([np.asarray(o.outputs.embedding, dtype=np.float32) for o in outs])

    return run


def timed(embed: Embed, batches: list[list[list[int]]], duration: float) -> float:
    """texts/s over consecutive batches until `duration` passes (at least one batch)."""
    embed(batches[0])
    texts, started = 0, time.perf_counter()
    for batch in batches[1:]:
        embed(batch)
        texts += len(batch)
        if time.perf_counter() - started >= duration:
            break
    return texts / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="comma-separated candidates (torch-fp32 always runs)")
    parser.add_argument("--cases", help="comma-separated cases of " + ",".join(c[0] for c in CASES))
    parser.add_argument("--out", default="bench/runs/cpu_runtimes.json")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from embedding_service.backends.model.resolve import demo_model_dir

    model_dir = args.model_dir or demo_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def tok(texts: list[str]) -> list[list[int]]:
        return [list(x) for x in tokenizer(texts, truncation=True, max_length=256)["input_ids"]]

    maker = TextMaker(seed=15)
    maker.calibrate(lambda texts: [len(x) for x in tok(texts)])
    short = tok([t for r in maker.requests(Workload("s", "short", 1, 1), 6000) for t in r])
    long = tok([t for r in maker.requests(Workload("l", "long", 1, 1), 400) for t in r])
    calib, accuracy_set, timing_short = short[:256], short[256:1256], short[1256:]
    only = {*args.only.split(","), "torch-fp32"} if args.only else None
    cases = [c for c in CASES if not args.cases or c[0] in args.cases.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        candidates = build_candidates(model_dir, args.threads, Path(tmp), calib, only)
        reference = np.concatenate([candidates["torch-fp32"](accuracy_set[i : i + 32])
                                    for i in range(0, len(accuracy_set), 32)])
        accuracy = {}
        for name, embed in candidates.items():
            vecs = np.concatenate([embed(accuracy_set[i : i + 32]) for i in range(0, len(accuracy_set), 32)])
            cos = (vecs * reference).sum(axis=1)
            accuracy[name] = {"cos_min": float(cos.min()), "cos_mean": float(cos.mean())}
            print(f"{name}: cos to torch fp32 min {cos.min():.6f} mean {cos.mean():.6f}", flush=True)
        rates: dict[str, dict[str, list[float]]] = {c[0]: {n: [] for n in candidates} for c in cases}
        offset = 0
        for round_no in range(args.rounds):
            for case, kind, size in cases:
                pool = timing_short if kind == "short" else long
                for name, embed in candidates.items():
                    # Fresh texts for every measurement (distinct, nothing cached), wrapping if exhausted.
                    start = offset % max(1, len(pool) - 400)
                    seqs = pool[start : start + 400]
                    offset += 97
                    batches = [seqs[i : i + size] for i in range(0, len(seqs), size)]
                    rates[case][name].append(timed(embed, batches, args.duration))
            print(f"round {round_no + 1}: " + ", ".join(
                f"{c}/{n}={v[-1]:.0f}" for c, d in rates.items() for n, v in d.items()), flush=True)
    report = {"model_dir": model_dir, "threads": args.threads, "duration_s": args.duration, "rounds": args.rounds,
              "accuracy": accuracy, "rates": rates}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(report))
    return 0


def table(report: dict[str, Any]) -> str:
    rates = report["rates"]
    names = list(report["accuracy"])
    lines = ["| candidate | cos min / mean vs torch fp32 | " + " | ".join(
        f"{case} texts/s (x torch, x vllm)" for case in rates) + " |", "|---|---|" + "---|" * len(rates)]
    for name in names:
        acc = report["accuracy"][name]
        cells = []
        for by_name in rates.values():
            med = statistics.median(by_name[name])
            vs_torch = statistics.median(a / b for a, b in zip(by_name[name], by_name["torch-fp32"], strict=True))
            cell = f"{med:.0f} ({vs_torch:.2f}x"
            if "vllm-fp32" in by_name:
                vs_vllm = statistics.median(a / b for a, b in zip(by_name[name], by_name["vllm-fp32"], strict=True))
                cell += f", {vs_vllm:.2f}x"
            cells.append(cell + ")")
        lines.append(f"| {name} | {acc['cos_min']:.5f} / {acc['cos_mean']:.5f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
