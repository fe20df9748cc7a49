"""vLLM in-process (offline `LLM.embed`): the reference ceiling the issue's targets are stated against.

Run by bench/run.py in a subprocess:  python -m bench.vllm_offline SPEC.json OUT.json
Each workload's texts go to `LLM.embed` in calls of `chunk` texts (vLLM schedules them itself) until the
duration passes. Prefix caching is off; texts are distinct anyway.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.loadgen import RunResult
from bench.workloads import as_sent


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    rows: list[dict[str, Any]] = []
    try:
        from vllm import LLM

        started = time.perf_counter()
        llm = LLM(
            model=spec["model_dir"],
            runner="pooling",
            dtype=spec.get("dtype", "float32"),
            max_model_len=spec["max_model_len"],
            enable_prefix_caching=False,
            seed=0,
        )
        load_s = time.perf_counter() - started
        for item in spec["workloads"]:
            work = item["workload"]
            requests, _ = as_sent(item["requests"], work.get("instruction"), server_formats=False)
            texts = [t for request in requests for t in request]
            warmup, _ = as_sent(item["warmup"], work.get("instruction"), server_formats=False)
            llm.embed([t for request in warmup for t in request], use_tqdm=False)
            chunk = spec.get("chunk", 256)
            result = RunResult()
            deadline = time.perf_counter() + spec["duration_s"]
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for start in range(0, len(texts), chunk):
                if time.perf_counter() >= deadline:
                    break
                began = time.perf_counter()
                outputs = llm.embed(texts[start : start + chunk], use_tqdm=False)
                result.latencies_ms.append((time.perf_counter() - began) * 1000)
                result.requests += 1
                result.texts += len(outputs)
                result.tokens += sum(len(o.prompt_token_ids) for o in outputs)
            result.wall_s = time.perf_counter() - wall0
            result.client_cpu_s = time.process_time() - cpu0
            rows.append(
                {
                    "target": "vllm-offline",
                    "workload": work["name"],
                    "load_s": round(load_s, 1),
                    **result.summary(),
                }
            )
            print(f"  vllm-offline {work['name']}: {rows[-1]['texts_per_s']} texts/s", flush=True)
    finally:
        Path(argv[1]).write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
