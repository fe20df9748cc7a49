"""Killed at any moment (SIGKILL), `embedding-service embed` run again finishes with the same output, byte for byte."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROWS = 240


def command(source: Path, output: Path, *extra: str) -> list[str]:
    # Small chunks and batches with a per-batch delay: a job of several seconds with many writes. (The fake
    # engine packs like vLLM, so bulk bounds its batches by tokens alone: 32, ~4 of these texts.)
    return [sys.executable, "-m", "embedding_service", "embed", str(source), "-o", str(output), "--chunk-rows", "16",
            "--engine", "fake", "--max-batch-size", "4", "--max-model-len", "32", "--max-batch-tokens", "32",
            "--log-level", "WARNING",
            *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "in.jsonl"
    path.write_text("".join(f'{{"id": "r{i}", "text": "resumable text {i} {"x " * (i % 9)}"}}\n'
                            for i in range(ROWS)))
    return path


@pytest.fixture(scope="module")
def expected(corpus: Path) -> dict[str, bytes]:
    out = {}
    for suffix in ("parquet", "npy", "jsonl"):
        target = corpus.parent / f"expected.{suffix}"
        subprocess.run(command(corpus, target, "--id-column", "id"), check=True, timeout=300)
        out[suffix] = target.read_bytes()
    return out


@pytest.mark.parametrize("fault", ["part-mid-write:3", "part-renamed:3", "manifest-mid-write:4",
                                   "manifest-renamed:4", "final-mid-write:1", "final-renamed:1"])
def test_killed_at_each_write_step_then_rerun_gives_the_same_bytes(corpus: Path, expected: dict[str, bytes],
                                                                    tmp_path: Path, fault: str) -> None:
    for suffix in ("parquet", "npy"):
        (tmp_path / suffix).mkdir()
        output = tmp_path / suffix / f"out.{suffix}"
        args = command(corpus, output, "--id-column", "id")
        killed = subprocess.run(args, env={**os.environ, "EMBEDDING_BULK_FAULT": fault}, capture_output=True,
                                timeout=300)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        finished = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert finished.returncode == 0, finished.stderr
        assert "were done before (resumed)" in finished.stderr  # continued, not started over
        assert output.read_bytes() == expected[suffix]
        assert [p.name for p in output.parent.iterdir()] == [output.name], "the work folder is gone"


def test_killed_at_random_moments_then_rerun_gives_the_same_bytes(corpus: Path, expected: dict[str, bytes],
                                                                   tmp_path: Path) -> None:
    seed = int(os.environ.get("BULK_RESUME_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    for suffix in ("parquet", "jsonl"):
        output = tmp_path / f"out.{suffix}"
        # 60 batches of 100 ms: a job longer than the longest wait below, so the first run is always killed.
        args = command(corpus, output, "--id-column", "id", "--fake-delay-ms", "100")
        kills = 0
        for _attempt in range(25):
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                proc.wait(rng.uniform(1.5, 5.0))  # Python start-up takes ~1-2 s; kills land across the job
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                kills += 1
                continue
            assert proc.returncode == 0, f"seed {seed}: {proc.stderr.read() if proc.stderr else ''}"
            break
        else:
            pytest.fail(f"seed {seed}: never finished in 25 runs")
        assert kills >= 1, f"seed {seed}: the job finished before any kill; slow it down"
        assert output.read_bytes() == expected[suffix], f"seed {seed}"
