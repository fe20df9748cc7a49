"""One writer per output: a second `embed` on a busy output is refused in one line naming the first; a dead run's
lock is no obstacle. Real processes race and are killed (SIGKILL); the output always equals an uninterrupted run's."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedding_service.bulk.command import BUSY_EXIT
from embedding_service.cli import main

ROWS = 240
REFUSAL = re.compile(r"embedding-service: embed: (\S+) is being written by another run \(pid (\d+) on (\S+), "
                     r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\); wait for it to end, or stop it and run this "
                     r"again to resume its work")


def command(source: Path, output: Path, *extra: str) -> list[str]:
    # 16-row chunks, 4-text batches of 10 ms each: a job of ~0.6 s with some thirty part and manifest writes.
    return [sys.executable, "-m", "embedding_service", "embed", str(source), "-o", str(output), "--chunk-rows", "16",
            "--engine", "fake", "--max-batch-size", "4", "--max-model-len", "32", "--max-batch-tokens", "32",
            "--fake-delay-ms", "10", "--id-column", "id", "--log-level", "WARNING", *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lock") / "in.jsonl"
    path.write_text("".join(f'{{"id": "r{i}", "text": "locked text {i} {"y " * (i % 9)}"}}\n' for i in range(ROWS)))
    return path


@pytest.fixture(scope="module")
def expected(corpus: Path) -> dict[str, bytes]:
    out = {}
    for suffix in ("parquet", "jsonl"):
        target = corpus.parent / f"expected.{suffix}"
        subprocess.run(command(corpus, target), check=True, timeout=120)
        out[suffix] = target.read_bytes()
    return out


def hold_lock(output: Path) -> subprocess.Popen[str]:
    """Another process holding `output`'s lock, as a run does, until killed."""
    code = ("import sys, time; from pathlib import Path; from embedding_service.bulk.lock import WorkLock; "
            "out = Path(sys.argv[1]); WorkLock.acquire(out.with_name(out.name + '.partial'), out); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(output)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_busy_output_is_refused_in_one_line_and_a_dead_holder_is_no_obstacle(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in.txt").write_text("".join(f"text {i}\n" for i in range(20)))
    output = tmp_path / "out.parquet"
    holder = hold_lock(output)
    try:
        assert main(["embed", str(tmp_path / "in.txt"), "-o", str(output), "--engine", "fake",
                     "--log-level", "WARNING"]) == BUSY_EXIT
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        found = REFUSAL.fullmatch(err[0])
        assert found, err[0]
        assert found.groups() == (str(output), str(holder.pid), socket.gethostname())
        assert not output.exists()
        assert sorted(p.name for p in (tmp_path / "out.parquet.partial").iterdir()) == ["lock"]  # left alone
        # --overwrite does not break in either.
        assert main(["embed", str(tmp_path / "in.txt"), "-o", str(output), "--engine", "fake", "--overwrite",
                     "--log-level", "WARNING"]) == BUSY_EXIT
    finally:
        holder.kill()
        holder.wait(10)
    # kill -9 released it: the next run takes the stale lock file over and cleans up after itself.
    assert main(["embed", str(tmp_path / "in.txt"), "-o", str(output), "--engine", "fake",
                 "--log-level", "WARNING"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.parquet"]


def test_a_refused_or_failed_run_leaves_no_work_folder_of_its_own(tmp_path: Path) -> None:
    # The lock creates `<output>.partial/`; a run that stops before any work removes it again.
    (tmp_path / "in.txt").write_text("")
    assert main(["embed", str(tmp_path / "in.txt"), "-o", str(tmp_path / "out.parquet"), "--engine", "fake",
                 "--log-level", "WARNING"]) == 1  # empty input
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def _outcome(proc: subprocess.Popen[str], other: subprocess.Popen[str], timeout: float) -> str:
    """'done', 'refused' (checked: one line naming `other`) or 'killed'."""
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode == -signal.SIGKILL:
        return "killed"
    if proc.returncode == BUSY_EXIT:
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        found = REFUSAL.fullmatch(lines[0])
        assert found and found.group(2) == str(other.pid), (lines[0], other.pid)
        return "refused"
    assert proc.returncode == 0, err
    return "done"


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_runs_racing_on_one_output(corpus: Path, expected: dict[str, bytes], tmp_path: Path) -> None:
    seed = int(os.environ.get("BULK_LOCK_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    outcomes: dict[tuple[str, str], int] = {}
    deadline = time.monotonic() + 90
    races = 0
    while races < 20 and time.monotonic() < deadline:
        suffix = ("parquet", "jsonl")[races % 2]
        folder = tmp_path / f"race{races}"
        folder.mkdir()
        output = folder / f"out.{suffix}"
        first = _start(command(corpus, output))
        time.sleep(rng.uniform(0.0, 1.6))  # start-up ~0.5 s, job ~0.6 s: the second lands anywhere in the first
        second = _start(command(corpus, output))
        pair = (_outcome(first, second, 120), _outcome(second, first, 120))
        outcomes[pair] = outcomes.get(pair, 0) + 1
        assert "done" in pair, f"seed {seed}: {pair}"
        assert output.read_bytes() == expected[suffix], f"seed {seed}, race {races}: {pair}"
        assert [p.name for p in folder.iterdir()] == [output.name], f"seed {seed}: the work folder is gone"
        races += 1
    print(f"seed {seed}: {races} races, (first, second) outcomes: {outcomes}")
    assert races >= 10, f"seed {seed}: only {races} races in the time allowed"
    refused = sum(n for pair, n in outcomes.items() if "refused" in pair)
    assert refused >= races // 4, f"seed {seed}: the runs hardly overlapped: {outcomes}"  # the race really ran


@pytest.mark.slow
def test_racing_runs_killed_at_random_moments_then_rerun(corpus: Path, expected: dict[str, bytes],
                                                         tmp_path: Path) -> None:
    seed = int(os.environ.get("BULK_LOCK_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    kills = 0
    outcomes: dict[tuple[str, str], int] = {}
    deadline = time.monotonic() + 90
    rounds = 0
    while rounds < 12 and time.monotonic() < deadline:
        suffix = ("parquet", "jsonl")[rounds % 2]
        folder = tmp_path / f"round{rounds}"
        folder.mkdir()
        output = folder / f"out.{suffix}"
        procs = [_start(command(corpus, output))]
        time.sleep(rng.uniform(0.0, 1.0))
        procs.append(_start(command(corpus, output)))
        time.sleep(rng.uniform(0.0, 0.8))
        victim = rng.choice(procs)
        if victim.poll() is None:
            victim.send_signal(signal.SIGKILL)
            kills += 1
        pair = (_outcome(procs[0], procs[1], 120), _outcome(procs[1], procs[0], 120))
        outcomes[pair] = outcomes.get(pair, 0) + 1
        # Whatever happened, the same command run again ends with an uninterrupted run's bytes.
        rerun = subprocess.run(command(corpus, output), capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, f"seed {seed}: {rerun.stderr}"
        assert output.read_bytes() == expected[suffix], f"seed {seed}, round {rounds}"
        assert [p.name for p in folder.iterdir()] == [output.name], f"seed {seed}: the work folder is gone"
        rounds += 1
    print(f"seed {seed}: {rounds} rounds, {kills} kills, outcomes: {outcomes}")
    assert rounds >= 6, f"seed {seed}: only {rounds} rounds in the time allowed"
    assert kills >= rounds // 3, f"seed {seed}: only {kills} kills landed in {rounds} rounds"
