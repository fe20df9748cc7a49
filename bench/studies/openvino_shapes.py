"""Memory of OpenVINO's CPU plugin against the number of input shapes it has seen, with no server around it.

    python -m bench.studies.openvino_shapes --ir ~/.cache/embedding-service/openvino/<export>/model.xml \
        --variant default|cap64|bucket16 [--minutes 15] [--out DIR]

Runs the exported IR on batches of 1-32 rows of random ids, 4-128 tokens long (one thread), and prints resident
memory, batches and distinct shapes every 30 s. `capN` compiles with CPU_RUNTIME_CACHE_CAPACITY=N; `bucketN`
rounds lengths up to a multiple of N (fewer shapes). Run the variants side by side: memory per shape, not
speed, is what they compare (docs/reliability.md "Memory under long traffic" has the session-31 figures).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import psutil


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ir", required=True, help="model.xml of an export (the openvino engine's cache)")
    parser.add_argument("--variant", default="default", help="default, capN or bucketN")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=None, help="write VARIANT.json there")
    args = parser.parse_args(argv)

    import openvino as ov

    settings: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1,
                                   "PERFORMANCE_HINT": "LATENCY"}
    bucket = 1
    if args.variant.startswith("cap"):
        settings["CPU_RUNTIME_CACHE_CAPACITY"] = int(args.variant[3:])
    elif args.variant.startswith("bucket"):
        bucket = int(args.variant[6:])
    request = ov.Core().compile_model(str(Path(args.ir).expanduser()), "CPU", settings).create_infer_request()
    rng, ids_rng = random.Random(0), np.random.default_rng(0)
    process, started, batches, last = psutil.Process(), time.monotonic(), 0, -30.0
    shapes: set[tuple[int, int]] = set()
    rows_out: list[dict[str, float]] = []
    while (elapsed := time.monotonic() - started) < args.minutes * 60:
        rows, length = rng.randint(1, 32), -(-rng.randint(4, 128) // bucket) * bucket
        ids = ids_rng.integers(1000, 20000, size=(rows, length), dtype=np.int64)
        request.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        batches += 1
        shapes.add((rows, length))
        if elapsed - last >= 30:
            last = elapsed
            row = {"t": round(elapsed), "batches": batches, "shapes": len(shapes),
                   "rss_mb": round(process.memory_info().rss / 2**20, 1)}
            rows_out.append(row)
            print(args.variant, json.dumps(row), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.variant}.json").write_text(json.dumps(rows_out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
