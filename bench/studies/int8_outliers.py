"""int8 schemes on a model with activation outlier channels, and on the plain random shape: cosine to fp32.

    python -m bench.studies.int8_outliers [--data ../shared/data/retrieval-docstrings.jsonl] [--out DIR] [--full-size]

Builds the tiny random Qwen3 (testkit/random_models.py) twice, plain and with OUTLIER_CHANNELS (x20-x100 at every linear
layer's input), and reports min / mean cosine to OpenVINO fp32 over 500 texts (docstring documents and queries
from --data, else generated sentences) for: the int8 path before SmoothQuant (int8 weights, activations
quantised per group of 32 at run time), the same after SmoothQuant (today's `--quantize int8`), int8 weights
only, and NNCF's static int8 (per-channel weights, per-tensor activations) calibrated on 300 other texts, with
and without NNCF's SmoothQuant; and today's int8 IR with its activations in other groups (of 32, 128,
1024); at full size also int8 and fp32 with bf16 for the rest (the default dtype on a CPU with native bf16).
Accuracy only: speed is bench/studies/cpu_runtimes.py and `python -m bench`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _texts(data: Path | None) -> tuple[list[str], list[str]]:
    if data is not None and data.is_file():
        rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()[:1500]]
        return ([r["query"] + "\n" + r["document"] for r in rows[:300]],
                [r["document"] for r in rows[1000:1300]] + [r["query"] for r in rows[1300:1500]])
    from testkit.random_models import generated_corpus

    lines = generated_corpus(40_000, seed=7)
    return lines[:300], lines[300:800]


def measure(model_dir: Path, calib_texts: list[str], eval_texts: list[str], cache: Path,
            groups_only: bool = False) -> dict[str, Any]:
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    from embedding_service.backends.base import BackendOptions
    from embedding_service.backends.model.facts import read_model_facts
    from embedding_service.backends.openvino import embed as openvino_backend
    from embedding_service.backends.openvino.embed import OpenVinoBackend, pad_batch
    from embedding_service.config import EmbeddingConfig

    def backend(quantize: str, folder: str = "exports") -> OpenVinoBackend:
        settings = EmbeddingConfig(_env_file=None, device="cpu", dtype="float32", max_model_len=512, quantize=quantize,
                                   openvino_cache_dir=str(cache / folder))  # type: ignore[call-arg]
        made = OpenVinoBackend(BackendOptions.from_config(settings, str(model_dir), read_model_facts(str(model_dir))))
        made.load()
        return made

    fp32 = backend("none")
    ids = [t[:128] for t in fp32.tokenize(eval_texts)]
    reference = np.concatenate([fp32.embed(ids[i : i + 16]) for i in range(0, len(ids), 16)])
    results: dict[str, Any] = {}

    def record(name: str, made: OpenVinoBackend) -> None:
        vectors = np.concatenate([made.embed(ids[i : i + 16]) for i in range(0, len(ids), 16)])
        cos = (vectors * reference).sum(axis=1)
        results[name] = {"cos_min": float(cos.min()), "cos_mean": float(cos.mean())}
        print(f"{model_dir.name}: {name}: cos min {cos.min():.5f} mean {cos.mean():.5f}", flush=True)

    core = ov.Core()
    settings = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}

    def swap(made: OpenVinoBackend, model: Any, group: int, precision: str = "f32") -> OpenVinoBackend:
        """`made` running `model` (an IR path or an ov.Model), activations quantised in groups of `group`, the
        layers int8 leaves alone in `precision` (bf16: what `--dtype` float16/bfloat16 gives on a CPU with
        native bf16)."""
        made._request = core.compile_model(model, "CPU", {**settings, "DYNAMIC_QUANTIZATION_GROUP_SIZE": group,
                                                          "INFERENCE_PRECISION_HINT": precision}
                                           ).create_infer_request()
        return made

    int8 = backend("int8")
    shipped = openvino_backend.activation_group(read_model_facts(str(model_dir)).linear_widths)
    record(f"int8 (SmoothQuant a=0.5, then int8 weights + activations in groups of {shipped}): --quantize int8", int8)
    for group in (g for g in (32, 128, 1024) if g != shipped):  # the activations' scales: coarser is faster
        record(f"the same, activations quantised in groups of {group} (--quantize int8 uses {shipped} here)",
               swap(int8, str(int8.ir_path), group))
    if groups_only:
        # The default dtype (float16) runs as bf16 where the CPU has it natively, int8 included.
        record(f"the same in groups of {shipped}, the rest in bf16 (--quantize int8 at the default dtype, bf16 CPU)",
               swap(int8, str(int8.ir_path), shipped, "bf16"))
        record("fp32 IR in bf16, no int8 (--dtype bfloat16: the model's own sensitivity)",
               swap(int8, str(fp32.ir_path), 0, "bf16"))
        return results
    smooth = openvino_backend.smooth_decoder
    openvino_backend.smooth_decoder = lambda *_args, **_kw: 0  # type: ignore[assignment]
    try:
        record("int8 weights + dynamic activations, no SmoothQuant (before issue 41)", backend("int8", "no-smoothing"))
    finally:
        openvino_backend.smooth_decoder = smooth
    base = core.read_model(str(fp32.ir_path))
    weights = nncf.compress_weights(base.clone(), mode=nncf.CompressWeightsMode.INT8_ASYM)
    record("int8 weights only (fp32 activations)", swap(fp32, weights, 0))
    calib = [t[:128] for t in fp32.tokenize(calib_texts)]
    dataset = nncf.Dataset([dict(zip(("input_ids", "attention_mask"), pad_batch(calib[i : i + 8], fp32._pad_id),
                                     strict=True)) for i in range(0, len(calib), 8)])
    for alpha in (-1.0, 0.5, 0.95):
        advanced = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha))
        static = nncf.quantize(base.clone(), dataset, model_type=nncf.ModelType.TRANSFORMER,
                               subset_size=len(calib) // 8, advanced_parameters=advanced)
        record(f"NNCF static int8, SmoothQuant {'off' if alpha < 0 else f'a={alpha}'}", swap(fp32, static, 0))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data"
                        / "retrieval-docstrings.jsonl")
    parser.add_argument("--out", type=Path, default=Path("bench/runs/int8_outliers.json"))
    parser.add_argument("--full-size", action="store_true",
                        help="the Qwen3-Embedding-0.6B shape instead of the tiny one, its outliers compensated in the "
                        "weights (build_random_qwen3's docstring says why): the outlier model only, and only "
                        "today's int8 at activation groups of 32, 128 and 1,024, and in bf16 (~20 min on 2 cores)")
    args = parser.parse_args(argv)
    from testkit.random_models import OUTLIER_CHANNELS, QWEN3_0_6B_SHAPE, build_random_qwen3

    calib_texts, eval_texts = _texts(args.data)
    report = {}
    models = (("outliers", OUTLIER_CHANNELS),) if args.full_size else (("plain", None), ("outliers", OUTLIER_CHANNELS))
    with tempfile.TemporaryDirectory() as tmp:
        for name, channels in models:
            model_dir = build_random_qwen3(Path(tmp) / name, outlier_channels=channels,
                                           shape=QWEN3_0_6B_SHAPE if args.full_size else None,
                                           compensate_outliers=args.full_size)
            report[name] = measure(model_dir, calib_texts, eval_texts, Path(tmp) / f"cache-{name}",
                                   groups_only=args.full_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
