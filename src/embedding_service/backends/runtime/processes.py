"""Child-process bookkeeping for backends that start workers (vLLM's engine core and its workers).

A backend records the processes that appeared while it loaded, and after shutting down reaps any that
are still alive, so that no orphan outlives the server. psutil (a vLLM dependency) guards against pid reuse.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

__all__ = ["child_pids", "reap"]

log = logging.getLogger("embedding_service")


def child_pids() -> set[Any]:
    """This process's descendants as psutil.Process objects (empty where psutil is missing)."""
    try:
        import psutil
    except ImportError:
        return set()
    try:
        return set(psutil.Process().children(recursive=True))
    except psutil.Error:
        return set()


def reap(processes: set[Any], grace_s: float) -> list[int]:
    """Wait up to `grace_s` for `processes` to exit, then SIGTERM, then SIGKILL. Returns pids signalled."""
    if not processes:
        return []
    import psutil

    alive = [p for p in processes if _alive(p) and not _is_resource_tracker(p)]
    if not alive:
        return []
    _gone, alive = psutil.wait_procs(alive, timeout=grace_s)
    signalled = [p.pid for p in alive]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _gone, alive = psutil.wait_procs(alive, timeout=3)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=3)
    return signalled


def _alive(proc: Any) -> bool:
    import psutil

    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _is_resource_tracker(proc: Any) -> bool:
    """multiprocessing's resource tracker ignores SIGTERM and exits by itself when its parent does."""
    import psutil

    try:
        return any("resource_tracker" in part for part in proc.cmdline())
    except psutil.Error:
        return False
