"""Start-up time of a server with several models, two code versions side by side (A B A B ...).

    git archive BASE src | tar -x -C /tmp/base
    PYTHONPATH=src python -m bench.studies.startup --version base=/tmp/base/src --version new=src --rounds 4

The models file is the issue's three models, all on the torch engine: the demo all-MiniLM-L6-v2, a tiny random
Qwen3 (fp32) and a tiny random BERT cross-encoder (built once into `--workdir`). Each round starts each version's
server (`python -m embedding_service serve --models-file ...` with that version's source first on PYTHONPATH)
and times it from the process start to `/health/ready` 200 (every model loaded), then stops it (SIGTERM) and
waits for its exit. Prints one JSON line per start and a summary: the median per version and the per-round
ratio of each version's time to the first's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

MODELS = """models:
  - name: minilm
    demo: true
  - name: qwen3
    model_path: {qwen3}
    dtype: float32
  - name: reranker
    model_path: {reranker}
    task: rerank
"""


def _models_file(workdir: Path) -> Path:
    from embedding_service.backends.model.resolve import resolve_model_dir
    from testkit.random_models import build_random_cross_encoder, build_random_qwen3

    workdir.mkdir(parents=True, exist_ok=True)
    qwen3, reranker = workdir / "qwen3", workdir / "reranker"
    if not (qwen3 / "config.json").is_file():
        build_random_qwen3(qwen3)
    if not (reranker / "config.json").is_file():
        build_random_cross_encoder(reranker, resolve_model_dir("", None, True))
    path = workdir / "models.yaml"
    path.write_text(MODELS.format(qwen3=qwen3, reranker=reranker))
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_seconds(src: str, models: Path, log: Path, timeout_s: float = 300.0) -> float:
    """Seconds from starting a server of the code in `src` to its /health/ready answering 200."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "embedding_service", "serve", "--models-file", str(models), "--engine", "torch",
           "--host", "127.0.0.1", "--port", str(port)]
    started = time.perf_counter()
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while time.perf_counter() - started < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}: see {log}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"not ready after {timeout_s}s: see {log}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="append", required=True, metavar="NAME=SRC",
                        help="a code version: its name and its src folder (give two or more)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/embedding-bench-startup")
    args = parser.parse_args()
    versions = [tuple(item.split("=", 1)) for item in args.version]
    workdir = Path(args.workdir)
    models = _models_file(workdir)
    times: dict[str, list[float]] = {name: [] for name, _ in versions}
    for round_ in range(args.rounds):
        for name, src in versions:
            seconds = start_seconds(str(Path(src).resolve()), models, workdir / f"{name}.log")
            times[name].append(seconds)
            print(json.dumps({"round": round_, "version": name, "ready_s": round(seconds, 2)}), flush=True)
    first = versions[0][0]
    for name, _ in versions:
        ratios = [mine / base for mine, base in zip(times[name], times[first], strict=True)]
        print(json.dumps({"version": name, "median_ready_s": round(statistics.median(times[name]), 2),
                          "ready_s": [round(t, 2) for t in times[name]],
                          f"ratio_to_{first}": [round(r, 3) for r in ratios],
                          "median_ratio": round(statistics.median(ratios), 3)}), flush=True)


if __name__ == "__main__":
    main()
