"""CPU time and context switches per thread of a running process over an interval (Linux /proc).

    python -m bench.thread_cpu PID [SECONDS]

Shows where a server's cores go under load: the event loop's thread against the model's OpenMP team, and
how often each was pre-empted (involuntary switches) or went to sleep (voluntary: an OpenMP thread that
waited at a barrier past its spin count). Threads that used no CPU and barely switched are left out.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

__all__ = ["sample", "threads_delta"]

Sample = dict[int, tuple[str, int, int, float]]  # tid -> (name, voluntary, involuntary, cpu seconds)


def sample(pid: int) -> Sample:
    out: Sample = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        out[int(task.name)] = (name, int(status["voluntary_ctxt_switches"]),
                               int(status["nonvoluntary_ctxt_switches"]), (int(stat[11]) + int(stat[12])) / tick)
    return out


def threads_delta(before: Sample, after: Sample) -> list[tuple[int, str, int, int, float]]:
    """(tid, name, voluntary, involuntary, cpu s) for threads alive at both ends that did something."""
    rows = []
    for tid, (name, vol, invol, cpu) in after.items():
        if tid in before:
            _, vol0, invol0, cpu0 = before[tid]
            if cpu - cpu0 > 0 or invol - invol0 > 10:
                rows.append((tid, name, vol - vol0, invol - invol0, cpu - cpu0))
    return sorted(rows, key=lambda row: -row[4])


def main(argv: list[str]) -> int:
    pid, seconds = int(argv[0]), float(argv[1]) if len(argv) > 1 else 10.0
    before = sample(pid)
    time.sleep(seconds)
    print(f"{'thread':<20} {'tid':>8} {'cpu s':>7} {'voluntary':>10} {'involuntary':>12}")
    for tid, name, vol, invol, cpu in threads_delta(before, sample(pid)):
        name = "main thread" if tid == pid else name  # (Python's threads all show as "python")
        print(f"{name:<20} {tid:>8} {cpu:7.2f} {vol:>10} {invol:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
