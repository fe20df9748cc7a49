"""Killed at any moment (SIGKILL), `embedding-service embed` run again finishes with the same output, byte for byte."""

from __future__ import annotations

import json
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
MAX_KILLS = 8


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


def wait_for_lock(output: Path, proc: subprocess.Popen[str], timeout: float) -> None:
    """Until `proc` has taken the output's lock (its pid in the lock file's owner record) or has exited."""
    lock = output.parent / f"{output.name}.partial" / "lock"
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads(lock.read_bytes() or b"{}").get("pid") == proc.pid:
                return
        except (OSError, ValueError):
            pass  # not there yet, or being written
        time.sleep(0.01)


def test_killed_at_random_moments_then_rerun_gives_the_same_bytes(corpus: Path, expected: dict[str, bytes],
                                                                   tmp_path: Path) -> None:
    seed = int(os.environ.get("BULK_RESUME_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    for suffix in ("parquet", "jsonl"):
        output = tmp_path / f"out.{suffix}"
        # 60 batches of 100 ms: a job longer than the longest wait below, so the first run is always killed.
        args = command(corpus, output, "--id-column", "id", "--fake-delay-ms", "100")
        # Up to 8 runs killed at random moments, each timed from when the run holds the output's lock (its
        # first step once Python has started), then one left to finish. Before, runs were killed 1.5-5 s after
        # they started until one finished by itself: on a busy machine start-up and the model load took most of
        # that window, the runs made little or no progress, and the job never finished in 25 runs.
        kills, parts_seen = 0, []
        for attempt in range(MAX_KILLS + 1):
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                if attempt < MAX_KILLS:
                    wait_for_lock(output, proc, 120)
                    proc.wait(rng.uniform(0.0, 3.5))
                else:
                    proc.wait(300)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                kills += 1
                parts_seen.append(len(list(output.parent.glob(f"{output.name}.partial/part-*"))))
                continue
            assert proc.returncode == 0, f"seed {seed}: {proc.stderr.read() if proc.stderr else ''}"
            break
        print(f"\nseed {seed} {suffix}: {kills} kills, parts done at each: {parts_seen}")
        assert kills >= 1, f"seed {seed}: the job finished before any kill; slow it down"
        assert output.read_bytes() == expected[suffix], f"seed {seed}"
