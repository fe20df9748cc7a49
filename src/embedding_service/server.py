"""The uvicorn runner with a graceful drain on SIGTERM/SIGINT.

Plain uvicorn, on SIGTERM, closes its listener at once and waits for open connections. A load
balancer's health check then just fails to connect, and a client whose request races the close gets
a reset. Here the first signal instead:

1. turns the engine to DRAINING: `/health` answers 503 "draining", new embedding requests 503 with
   `Retry-After`, and responses carry `Connection: close` so clients stop reusing connections;
2. keeps serving until every accepted request is answered (or `shutdown_timeout` has passed);
3. then lets uvicorn close the listener and finish, with what is left of the same deadline, and exits 0.

A second signal stops waiting. If the engine dies, the app's `on_fatal` sets `should_exit` and the
process exits non-zero for its supervisor to restart (systemd Restart=always, Kubernetes).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from types import FrameType

import uvicorn

from .engine.engine import EmbeddingEngine

__all__ = ["DrainingServer"]

log = logging.getLogger("embedding_service")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: EmbeddingEngine, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self._drain_requested = False
        self._deadline: float | None = None
        self._drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._drain_requested and not self.should_exit:
            # Runs on the loop's thread between callbacks: flip the engine to draining now (two attribute
            # writes), on_tick does the rest. The signal is not recorded for uvicorn to re-raise at exit:
            # a drained server exits 0 instead of dying of SIGTERM.
            self._drain_requested = True
            self._deadline = time.monotonic() + self.shutdown_timeout
            self.engine.begin_drain(self.shutdown_timeout)
            return
        log.warning("second %s: stopping without waiting for requests in progress", signal.Signals(sig).name)
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested:
            now = time.monotonic()
            if not self._drain_logged:
                self._drain_logged = True
                log.info("draining: refusing new requests, finishing accepted ones (up to %.0fs)",
                         self.shutdown_timeout)
            assert self._deadline is not None
            if self.engine.idle or now >= self._deadline:
                if not self.engine.idle:
                    log.warning("shutdown_timeout reached with requests still in progress")
                self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's own wait for connections gets what is left of the drain deadline, not a fresh one.
        remaining = self.shutdown_timeout if self._deadline is None else self._deadline - time.monotonic()
        self.config.timeout_graceful_shutdown = max(0.1, remaining)  # type: ignore[assignment]
        await super().shutdown(sockets)

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        super().run(sockets)
        if self._drain_requested and self.engine.batches_running:
            # The deadline passed with a batch still inside the model: its thread cannot be interrupted, and
            # the interpreter would wait for it at exit. The deadline is a promise to the supervisor: go now.
            log.warning("exiting with a batch still running in the model (shutdown_timeout %.0fs)",
                        self.shutdown_timeout)
            logging.shutdown()
            os._exit(0)
