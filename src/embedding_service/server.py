"""The uvicorn runner with a graceful drain on SIGTERM/SIGINT that answers every accepted connection.

Plain uvicorn, on SIGTERM, closes its listener at once: a load balancer's health check then fails to
connect, and every connection the kernel had already accepted but uvicorn had not yet picked up (its
accept backlog) is reset. Here the first signal instead:

1. turns the engine to DRAINING: `/health` answers 503 "draining", new embedding requests 503 with
   `Retry-After`, and every response carries `Connection: close`; new connections are still accepted and
   answered the same way;
2. keeps serving until every accepted request is answered (or `shutdown_timeout` has passed);
3. stops the kernel from starting new handshakes on the listener (a socket filter drops incoming SYNs, so
   later clients are refused rather than accepted and reset), answers what is left in the accept backlog
   and on connections that have not sent their request yet, and only then closes the listener and exits 0.

A second signal stops waiting. If the engine dies, the app's `on_fatal` sets `should_exit` and the
process exits non-zero for its supervisor to restart (systemd Restart=always, Kubernetes). A signal while
the model is still loading exits at once: a load cannot be interrupted inside its thread, and nothing was
accepted yet that a wait would serve.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from types import FrameType
from typing import Any

import uvicorn

from .backends.runtime.processes import child_pids, reap
from .config import EmbeddingConfig
from .engine.core import EngineCore
from .errors import ErrorKind
from .transport import ConnectionLimits, GuardedHttpProtocol, guarded_protocol, raise_file_limit

__all__ = ["DrainingServer", "accept_backlog", "freeze_startup_heap", "listening_sockets", "refuse_new_handshakes",
           "uvicorn_config"]

log = logging.getLogger("embedding_service")

# After the drain, how long the backlog and connections that have not sent their request yet may still take.
_BACKLOG_GRACE_S = 0.5
_BACKLOG = 2048  # uvicorn's default

# Classic BPF: drop a TCP segment with SYN set and ACK clear (a new handshake), accept everything else. A
# socket filter sees the segment from its TCP header (offset 13 = the flags byte); children inherit it,
# where it never matches. SO_ATTACH_FILTER = 26 on Linux.
_SYN_DROP = ((0x30, 0, 0, 13), (0x54, 0, 0, 0x12), (0x15, 0, 1, 0x02), (0x06, 0, 0, 0), (0x06, 0, 0, 0xFFFFFFFF))
_SO_ATTACH_FILTER = 26
_filter_code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in _SYN_DROP))


def refuse_new_handshakes(sockets: Iterable[Any]) -> bool:
    """Make the kernel drop new SYNs on these listeners (Linux); True when it did on every one."""
    if not sys.platform.startswith("linux"):
        return False
    program = struct.pack("HL", len(_SYN_DROP), ctypes.addressof(_filter_code))
    done = True
    for sock in sockets:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, program)
        except OSError as exc:
            log.warning("could not stop new connections on the listener: %s", exc)
            done = False
    return done


def accept_backlog(sockets: Iterable[Any]) -> int:
    """Connections the kernel has accepted that the server has not picked up yet (Linux's TCP_INFO of a
    listening socket reports its accept-queue length in tcpi_unacked); 0 where unknown."""
    total = 0
    for sock in sockets:
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except (OSError, AttributeError):
            continue
        if len(info) >= 28:
            total += struct.unpack_from("I", info, 24)[0]
    return total


def uvicorn_config(app: Any, settings: EmbeddingConfig) -> uvicorn.Config:
    """uvicorn's settings for `app`: the guarded protocol (transport.py), keep-alive, drain, proxies."""
    limits = ConnectionLimits(header_timeout_s=settings.header_timeout_s, body_timeout_s=settings.body_timeout_s,
                              max_header_bytes=settings.max_header_bytes,
                              max_connections=raise_file_limit(settings.max_connections))
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower() if settings.log_level != "INFO" else "warning",
        access_log=settings.log_level == "DEBUG",
        log_config=None,
        http=guarded_protocol(limits),
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # (a float works)
        timeout_graceful_shutdown=max(0.1, settings.shutdown_timeout),  # type: ignore[arg-type]
        h11_max_incomplete_event_size=settings.max_header_bytes,
        server_header=False,  # no version banner for scanners
        # X-Forwarded-For rewrites the client address (rate limits, logs): only from the proxies named.
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=",".join(settings.forwarded_allow_ips) or "",
    )


def freeze_startup_heap() -> None:
    """Once the models are loaded: collect, then move every object alive (frameworks, routes, the model's Python
    objects) to the collector's permanent generation. They live as long as the process, and every full
    collection would walk them again: ~22 ms each on the fake engine, 18-23 of them in 10 s at 64 clients
    (bench/RESULTS.md, session 28). vLLM's own server does the same after its engine starts."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.debug("start-up heap frozen: %d objects, %.0f ms", gc.get_freeze_count(), (time.perf_counter() - started) * 1e3)


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` listeners on one address, one per process, in one SO_REUSEPORT group (bound and listening here,
    inherited by the processes).

    Why not one shared listener: a process that wakes for a burst of connections accepts all it can before
    the others wake (uvloop accepts until the backlog is empty), so wrk's 64 connections were split 4/60 or
    9/55 between two processes, and the busy one's core capped the server. With a listener each, the kernel
    spreads connections by a hash of their addresses. A listener whose process died keeps its connections
    queued (the parent holds it open) until the replacement takes them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # (port 0: the others join the port the first one got)
            sock.listen(_BACKLOG)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _Engines:
    """The embedding engine and the reranker's, drained as one."""

    def __init__(self, engines: Sequence[EngineCore]) -> None:
        self.engines = list(engines)

    @property
    def loading(self) -> bool:
        return any(engine.loading for engine in self.engines)

    @property
    def idle(self) -> bool:
        return all(engine.idle for engine in self.engines)

    @property
    def batches_running(self) -> int:
        return sum(engine.batches_running for engine in self.engines)

    def begin_drain(self, timeout_s: float) -> None:
        for engine in self.engines:
            engine.begin_drain(timeout_s)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: EngineCore | Sequence[EngineCore],
                 shutdown_timeout: float, exit_status: Callable[[], int] = lambda: 0) -> None:
        super().__init__(config)
        self.exit_status = exit_status  # the process's status (reporting why) when it cannot return one
        self.engine = engine if isinstance(engine, EngineCore) else _Engines(engine)  # embed and/or rerank
        self.shutdown_timeout = shutdown_timeout
        self._drain_requested = False
        self._deadline: float | None = None
        self._drain_logged = False
        self._closing_since: float | None = None  # step 3: no new handshakes, emptying the backlog
        self._exit_during_load = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._drain_requested and not self.should_exit:
            # Runs on the loop's thread between callbacks: flip the engine to draining now (two attribute
            # writes), on_tick does the rest. The signal is not recorded for uvicorn to re-raise at exit:
            # a drained server exits 0 instead of dying of SIGTERM.
            self._drain_requested = True
            self._deadline = time.monotonic() + self.shutdown_timeout
            if self.engine.loading:
                self._exit_during_load = True
            self.engine.begin_drain(self.shutdown_timeout)
            return
        log.warning("second %s: stopping without waiting for requests in progress", signal.Signals(sig).name)
        super().handle_exit(sig, frame)

    @property
    def _listeners(self) -> list[Any]:
        return [sock for server in getattr(self, "servers", []) for sock in (server.sockets or ())]

    def _unanswered(self) -> list[GuardedHttpProtocol]:
        return [conn for conn in list(self.server_state.connections)
                if isinstance(conn, GuardedHttpProtocol) and conn.awaiting_request]

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and not self.should_exit:
            self._drain_tick(time.monotonic())
        return await super().on_tick(counter)

    def _drain_tick(self, now: float) -> None:
        assert self._deadline is not None
        if self._exit_during_load:
            log.info("signal during the model load: stopping the load and exiting")
            self.should_exit = True
            return
        if not self._drain_logged:
            self._drain_logged = True
            log.info("draining: refusing new requests, finishing accepted ones (up to %gs)", self.shutdown_timeout)
        if self._closing_since is None:
            if not (self.engine.idle or now >= self._deadline):
                return
            if not self.engine.idle:
                log.warning("shutdown_timeout reached with requests still in progress")
            self._closing_since = now
            refuse_new_handshakes(self._listeners)
            return  # a tick for handshakes already under way to land in the backlog
        settled = accept_backlog(self._listeners) == 0 and not self._unanswered()
        if settled or now >= max(self._deadline, self._closing_since) + _BACKLOG_GRACE_S:
            for conn in self._unanswered():  # accepted, request not (fully) sent: answer rather than reset
                conn.close_with(ErrorKind.DRAINING, "server is shutting down; retry on another instance",
                                "shutting_down")
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's own wait for connections gets what is left of the drain deadline, not a fresh one.
        remaining = self.shutdown_timeout if self._deadline is None else self._deadline - time.monotonic()
        self.config.timeout_graceful_shutdown = max(0.1, remaining)  # type: ignore[assignment]
        await super().shutdown(sockets)

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        super().run(sockets)
        loading = self.engine.loading
        if (self._drain_requested or self.should_exit) and (self.engine.batches_running or loading):
            # A batch inside the model, or the model load, is in a thread that cannot be interrupted, and
            # the interpreter would wait for it at exit. The deadline is a promise to the supervisor: go now.
            log.warning("exiting with %s still running (shutdown_timeout %gs)",
                        "the model load" if loading else "a batch", self.shutdown_timeout)
            reap(child_pids(), grace_s=0.0)  # (a vLLM load may have started engine-core processes)
            status = self.exit_status()  # e.g. 1: another model failed to load while this one loaded
            logging.shutdown()
            sys.stderr.flush()
            os._exit(status)
