"""`workers > 1`: N worker processes, each a DrainingServer with its own engine and its own listener on the port.

uvicorn's own multi-process mode runs plain uvicorn servers in its workers: no drain (a SIGTERM closes
each worker's listener at once) and no connection guards. Here the parent binds the listeners (one per
worker, in one SO_REUSEPORT group: server.listening_sockets says why), starts
the workers (spawned, so none inherits a half-initialised torch or vLLM), forwards SIGTERM/SIGINT to them
and waits: each worker drains as a single server does (see server.py) and exits 0. A worker that exits
on its own, non-zero (its model failed to load, its engine died), takes the others down and the parent
exits 1, for the supervisor (systemd, Kubernetes) to restart the whole server.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["run_workers"]

log = logging.getLogger("embedding_service")

_EXTRA_WAIT_S = 10.0  # beyond shutdown_timeout, for a worker's own exit (engine close, process reaping)


def run_workers(workers: int, bind: Callable[[], list[socket.socket]], target: Callable[[socket.socket], None],
                shutdown_timeout: float) -> int:
    """Start `workers` processes, the n-th running `target(sock)` on the n-th listener of `bind()`; 0 after a
    drain."""
    sockets = bind()
    context = multiprocessing.get_context("spawn")
    procs: list[Any] = [context.Process(target=target, args=(sock,), name=f"worker-{n}", daemon=False)
                        for n, sock in enumerate(sockets)]
    stopping: list[float] = []  # when the first signal came

    def forward(sig: int, _frame: FrameType | None) -> None:
        if not stopping:
            stopping.append(time.monotonic())
            log.info("%s: draining %d workers", signal.Signals(sig).name, workers)
        for proc in procs:  # a second signal is forwarded too: workers stop waiting
            if proc.pid is not None and proc.exitcode is None:
                os.kill(proc.pid, sig)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        for proc in procs:
            proc.start()
        while any(proc.exitcode is None for proc in procs):
            failed = [proc for proc in procs if proc.exitcode not in (None, 0)]
            if failed and not stopping:
                log.error("worker %s exited with %s: stopping the server", failed[0].name, failed[0].exitcode)
                code = 1
                forward(signal.SIGTERM, None)
            if stopping and time.monotonic() > stopping[0] + shutdown_timeout + _EXTRA_WAIT_S:
                for proc in procs:
                    if proc.exitcode is None:
                        log.warning("worker %s did not exit in time: killing it", proc.name)
                        proc.kill()
            time.sleep(0.05)
        for proc in procs:
            proc.join(1)
        if any(proc.exitcode != 0 for proc in procs):
            code = 1  # a worker failed, or had to be killed: not a clean drain
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in sockets:
            sock.close()
    return code
