"""Do the planned models fit in memory at all? Checked before any model loads, so that a start that cannot
succeed says so at once instead of being killed by the kernel in the middle of loading the third model.

The floor used is the size of the weight files on disk: every engine holds at least that in memory while it
loads (in its dtype it may hold more, never less). Only a plan whose floor is over what the machine (or its
cgroup) has available is refused: no guess about activations or caches can refuse a start that would work.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["available_bytes", "memory_shortfall"]

_GB = 1 << 30


def available_bytes(proc: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory this process may still take: MemAvailable, capped by a cgroup v2 limit; None if unknown."""
    available: int | None = None
    try:
        for line in proc.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((cgroup / "memory.current").read_text().strip())
            available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    return available


def memory_shortfall(weights: Mapping[str, int], available: int | None) -> str | None:
    """One line saying the models cannot fit (their weights alone exceed `available`), or None."""
    total = sum(weights.values())
    if available is None or total <= available:
        return None
    each = ", ".join(f"{name}: {size / _GB:.1f} GB" for name, size in weights.items() if size)
    return (f"the models' weights alone take {total / _GB:.1f} GB ({each}) but {max(available, 0) / _GB:.1f} GB "
            "of memory is available: serve fewer or smaller models, or give the server more memory")
