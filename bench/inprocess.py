"""The in-process ceiling: the same requests through our EmbeddingEngine (no HTTP), and raw backend.embed.

Run by bench/run.py in a subprocess (so torch and the model live apart from the load generator):
    python -m bench.inprocess SPEC.json OUT.json
SPEC: {"engine", "model_dir", "dtype", "duration_s", "max_batch_size", "workloads": [{workload, requests}]}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.loadgen import RunResult, run_async
from bench.workloads import as_sent

__all__ = ["run_engine_workload", "run_raw_workload"]


async def run_engine_workload(engine: Any, requests: list[list[str]], concurrency: int, duration_s: float,
                              instruction: str | None = None) -> RunResult:
    """Closed loop like the HTTP client, but calling engine.embed directly (the instruction as a field)."""
    from embedding_service.engine.types import EmbedRequest

    result = RunResult()
    next_index = 0
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(requests) and time.perf_counter() < deadline:
            texts = requests[next_index]
            next_index += 1
            started = time.perf_counter()
            try:
                out = await engine.embed(EmbedRequest(texts=texts, instruction=instruction))
            except Exception as exc:
                result.errors += 1
                result.error_samples.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
            result.requests += 1
            result.texts += len(texts)
            result.tokens += out.prompt_tokens

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - wall0
    result.client_cpu_s = time.process_time() - cpu0  # here: the whole engine's CPU (same process)
    return result


def run_raw_workload(backend: Any, requests: list[list[str]], batch_size: int, duration_s: float) -> RunResult:
    """Model only: texts tokenised up front (not timed), then backend.embed on full batches in order."""
    texts = [t for request in requests for t in request]
    result = RunResult()
    seqs = backend.tokenize(texts[: batch_size * 4])  # warm-up shapes
    backend.embed(seqs[:batch_size])
    seqs = backend.tokenize(texts)
    deadline = time.perf_counter() + duration_s
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for start in range(0, len(seqs), batch_size):
        if time.perf_counter() >= deadline:
            break
        chunk = seqs[start : start + batch_size]
        began = time.perf_counter()
        backend.embed(chunk)
        result.latencies_ms.append((time.perf_counter() - began) * 1000)
        result.requests += 1
        result.texts += len(chunk)
        result.tokens += sum(len(s) for s in chunk)
    result.wall_s = time.perf_counter() - wall0
    result.client_cpu_s = time.process_time() - cpu0
    return result


def _settings(spec: dict[str, Any]) -> Any:
    """The settings a bench run uses: isolated from the environment, the defaults except what `spec` says."""
    from embedding_service.config import EmbeddingConfig

    extra = {"max_model_len": spec["max_model_len"]} if "max_model_len" in spec else {}
    return EmbeddingConfig(_env_file=None, device=spec.get("device", "cpu"),  # type: ignore[call-arg]
                           dtype=spec.get("dtype", "float32"),
                           max_batch_size=spec["max_batch_size"], **extra, **spec.get("engine_options", {}))


def _build(spec: dict[str, Any]) -> Any:
    import dataclasses

    from embedding_service.backends import BackendOptions, create_backend, read_model_facts

    facts = read_model_facts(spec["model_dir"])
    options = BackendOptions.from_config(_settings(spec), spec["model_dir"], facts)
    # Matryoshka as detected (Qwen3), not because the default model_name is listed.
    return create_backend(spec["engine"], dataclasses.replace(options, model_label="bench-model",
                                                              matryoshka=facts.matryoshka))


async def _engine_pass(spec: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Engine workloads, then raw backend.embed on the same loaded backend (one load: vLLM's is slow)."""
    from embedding_service.engine.engine import EmbeddingEngine, EngineOptions

    engine = EmbeddingEngine(_build(spec), EngineOptions.from_config(_settings(spec)))
    started = time.perf_counter()
    await engine.start()
    load_s = time.perf_counter() - started
    label = spec["engine"]
    try:
        for item in spec["workloads"]:
            work = item["workload"]
            instruction = work.get("instruction")
            if "engine" in spec["modes"]:
                await run_engine_workload(engine, item["warmup"], work["concurrency"], spec["duration_s"],
                                          instruction)
                res = await run_engine_workload(engine, item["requests"], work["concurrency"], spec["duration_s"],
                                                instruction)
                rows.append(
                    {
                        "target": f"inproc-engine-{label}",
                        "workload": work["name"],
                        "load_s": round(load_s, 1),
                        **res.summary(),
                    }
                )
                print(
                    f"  inproc-engine-{label} {work['name']}: {res.summary()['texts_per_s']} texts/s",
                    flush=True,
                )
            if "raw" in spec["modes"]:
                # The engine is idle between awaits: calling its backend from here is safe.
                requests, _ = as_sent(item["requests"], instruction, server_formats=False)
                res = run_raw_workload(engine.backend, requests, spec["max_batch_size"], spec["duration_s"])
                rows.append({"target": f"inproc-raw-{label}", "workload": work["name"], **res.summary()})
                print(f"  inproc-raw-{label} {work['name']}: {res.summary()['texts_per_s']} texts/s", flush=True)
    finally:
        await engine.drain(5)
        await engine.stop()


def main(argv: list[str]) -> int:
    from embedding_service.logging_config import configure_logging

    spec = json.loads(Path(argv[0]).read_text())
    rows: list[dict[str, Any]] = []
    # The engine's per-request lines, as `serve` logs them (INFO by default): the ceiling is the same engine
    # doing the same work, without HTTP.
    configure_logging(_settings(spec).log_level)
    try:
        run_async(_engine_pass(spec, rows))
    finally:
        with open(argv[1], "w") as fh:
            json.dump(rows, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
