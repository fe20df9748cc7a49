"""`api_processes > 1`: N API processes in front of one engine process (this one).

Each API process accepts HTTP on the one listening socket (bound here, inherited), parses, tokenises, checks
limits and serialises, exactly as a single server does; its engines are `RemoteEmbeddingEngine`s and
`RemoteRerankEngine`s that send token ids to this process and get float32 rows back (engine/remote.py,
engine/wire.py). This process loads
each model once and batches the requests of every API process together (engine/host.py), so the queue
bounds, batch sizes and model memory are those of one server. Unlike `workers` (N full servers, N copies of
the model, N queues), only the request path is multiplied.

Lifecycle: the API processes start at once and answer /health 503 "loading" until every model has loaded
and every API process has connected. SIGTERM/SIGINT are forwarded: each API process drains as one server
does (server.py) while this process keeps batching for them, then the engines stop and this process exits 0.
An API process that exits on its own is restarted (its connections in flight are lost, as in any crash), at
most `_RESTARTS` times per `_RESTART_WINDOW_S`, past which the server stops and exits 1. A model's death
here is told to every API process: their requests answer 503 and they exit, and so does this process (1).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

from .backends.base import BackendDeadError
from .config import EmbeddingConfig
from .engine.core import EngineCore
from .engine.host import EngineHost
from .engine.loading import ModelLoad, ModelLoadError, load_models
from .engine.remote import EngineLink, RemoteEmbeddingEngine, RemoteRerankEngine
from .engine.types import EMBED, RERANK
from .metrics import QueueGauges, ServiceMetrics, use_multiprocess_files
from .service import ServicePlan, build_engines, model_cache, model_loads, open_result_cache

__all__ = ["remote_engines", "run_api_processes", "unsupported"]

log = logging.getLogger("embedding_service")

_RESTARTS = 5
_RESTART_WINDOW_S = 60.0
_EXTRA_WAIT_S = 10.0  # beyond shutdown_timeout, for an API process's own exit
_TICK_S = 0.05

ApiTarget = Callable[[socket.socket, str, int, bool], None]  # (sock, path, index, ready_first)


def unsupported(settings: EmbeddingConfig, plan: ServicePlan) -> str | None:
    """Why `api_processes > 1` cannot serve these settings yet (one line naming the setting), or None."""
    n = settings.api_processes
    if settings.workers > 1:
        return (f"api_processes={n} and workers={settings.workers} cannot be combined: choose one "
                "(docs/ops.md, 'Several processes')")
    if settings.data_dir:
        return f"data_dir (the Batch API) needs api_processes=1: one process runs the batches (got {n})"
    if settings.rate_limit_rpm or settings.rate_limit_tpm:
        return (f"rate_limit_rpm / rate_limit_tpm need api_processes=1: the limits live in one process "
                f"(got {n}); put the limits in a proxy, or serve with one API process")
    others = [f"'{name}' ({model.role})" for name, model in plan.models.items() if model.role not in (EMBED, RERANK)]
    if others:
        return (f"api_processes={n} serves embedding models and rerankers so far; {', '.join(others)} need "
                "api_processes=1")
    return None


def remote_engines(plan: ServicePlan, path: str) -> dict[str, EngineCore]:
    """An API process's engines: proxies of the engine process's, by served name, over one link. Each API
    process has its own result cache (docs/cache.md), looked up before a request crosses the link."""
    link = EngineLink(path)
    cache = open_result_cache(plan.result_cache)
    engines: dict[str, EngineCore] = {}
    for index, (name, model) in enumerate(plan.models.items()):
        if model.role == RERANK:
            assert model.max_documents is not None  # planned for the reranker's role
            engines[name] = RemoteRerankEngine(link, index, model.engine_options, model.backend.model_dir,
                                               max_documents=model.max_documents,
                                               result_cache=model_cache(model, cache))
        else:
            engines[name] = RemoteEmbeddingEngine(link, index, model.engine_options, model.backend.model_dir,
                                                  model_cache(model, cache))
    return engines


def run_api_processes(count: int, plan: ServicePlan, bind: Callable[[], list[socket.socket]], target: ApiTarget,
                      shutdown_timeout: float) -> int:
    """Load the planned models here and serve them to `count` API processes running `target(sock, path,
    index)`; 0 after a drain, 1 when a model failed (to load, or later) or API processes kept dying."""
    engines = build_engines(dataclasses.replace(plan, result_cache=None))  # (the API processes' caches answer)
    runner = _EngineProcess(model_loads(plan, engines), count, target, shutdown_timeout)
    try:
        import uvloop

        return uvloop.run(runner.run(bind))
    except ImportError:
        return asyncio.run(runner.run(bind))


class _EngineProcess:
    def __init__(self, loads: list[ModelLoad], count: int, target: ApiTarget, shutdown_timeout: float) -> None:
        self.loads = loads
        self.roles = {load.name: load.task for load in loads}
        self.models = [(load.name, load.engine) for load in loads]
        self.engines = [load.engine for load in loads]
        self.count = count
        self.target = target
        self.shutdown_timeout = shutdown_timeout
        self.host = EngineHost(self.engines, count)
        self.procs: list[Any] = []
        self.code = 0
        self.stopping: float | None = None  # when the stop began
        self.restarts: list[float] = []
        self.loaded = False
        self._context = multiprocessing.get_context("spawn")

    async def run(self, bind: Callable[[], list[socket.socket]]) -> int:
        loop = asyncio.get_running_loop()
        folder = tempfile.mkdtemp(prefix="embedding-engine-")  # 0700: only this user's processes connect
        path = os.path.join(folder, "engine.sock")
        os.mkdir(os.path.join(folder, "metrics"))
        use_multiprocess_files(os.path.join(folder, "metrics"))  # one /metrics view (metrics.py)
        metrics = ServiceMetrics()  # (its files: the batches; the API processes' hold their requests)
        for name, engine in self.models:
            metrics.add_model(name, engine, self.roles[name])
        queues = QueueGauges([(name, engine, self.roles[name]) for name, engine in self.models])
        gauges = loop.create_task(queues.run(), name="queue-gauges")
        sockets = bind()  # one listener per API process (server.listening_sockets)
        await self.host.start(path)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig)
        for index, engine in enumerate(self.engines):
            engine.on_dead = functools.partial(self._died, index)
        self.procs = [self._spawn(sockets[index], path, index) for index in range(self.count)]
        log.info("started %d API processes in front of one engine process (pid %d)", self.count, os.getpid())
        loader = loop.create_task(self._load(), name="model-load")
        try:
            while not (self.stopping is not None and all(p.exitcode is not None for p in self.procs)):
                self._supervise(sockets, path)
                await asyncio.sleep(_TICK_S)
            if not loader.done() or any(engine.loading for engine in self.engines):
                # a signal during the load, or a failure while another model loads: a load's thread cannot be
                # interrupted
                log.info("the model load was stopped: exiting")
                shutil.rmtree(folder, ignore_errors=True)
                os._exit(self.code)
            for proc in self.procs:
                proc.join(1)
            if self.code == 0 and any(p.exitcode != 0 for p in self.procs):
                self.code = 1  # an API process failed its drain, or had to be killed
            if self.loaded:  # (nothing is left to answer: what remains of the deadline, for the batches)
                left = max(0.0, self.stopping + self.shutdown_timeout - time.monotonic()) if self.stopping else 0.0
                for engine in self.engines:
                    await engine.drain(left)
            if any(engine.batches_running for engine in self.engines):
                # A batch inside the model is in a thread that cannot be interrupted, and the interpreter would
                # wait for it at exit (server.py does the same): the deadline is a promise to the supervisor.
                log.warning("exiting with a batch still running (shutdown_timeout %gs)", self.shutdown_timeout)
                os._exit(self.code)
        finally:
            gauges.cancel()
            await self.host.close()
            for engine in self.engines:
                await engine.stop()
            for sock in sockets:
                sock.close()
            shutil.rmtree(folder, ignore_errors=True)
        return self.code

    def _spawn(self, sock: socket.socket, path: str, index: int) -> Any:
        # A replacement for a process that died joins the accept loop only once ready: its first requests would
        # otherwise get 503 "loading" while the others could answer them. (At the first start every process
        # accepts at once and answers /health 503 while the models load, as one process does.)
        proc = self._context.Process(target=self.target, args=(sock, path, index, self.loaded), name=f"api-{index}",
                                     daemon=False)
        proc.start()
        return proc

    async def _load(self) -> None:
        try:
            await load_models(self.loads)
        except ModelLoadError as exc:
            self.fail(f"model load failed: {exc}")
            return
        self.loaded = True
        self.host.models_loaded()

    def _supervise(self, sockets: list[socket.socket], path: str) -> None:
        now = time.monotonic()
        if self.stopping is not None:
            if now > self.stopping + self.shutdown_timeout + _EXTRA_WAIT_S:
                for proc in self.procs:
                    if proc.exitcode is None:
                        log.warning("API process %s did not exit in time: killing it", proc.name)
                        proc.kill()
            return
        for index, proc in enumerate(self.procs):
            if proc.exitcode is None:
                continue
            self.restarts = [t for t in self.restarts if t > now - _RESTART_WINDOW_S] + [now]
            if len(self.restarts) > _RESTARTS:
                self.fail(f"API process {proc.name} exited with {proc.exitcode}, the {_RESTARTS + 1}th exit in "
                          f"{_RESTART_WINDOW_S:g}s: stopping the server")
                return
            log.error("API process %s (pid %s) exited with %s: starting another", proc.name, proc.pid, proc.exitcode)
            proc.join(0)
            self.procs[index] = self._spawn(sockets[index], path, index)

    def _died(self, index: int, exc: BaseException) -> None:
        death = self.engines[index].death or str(exc)
        self.host.model_died(index, death)
        self.code = 1
        if self.stopping is None:  # the API processes exit on their own (the death reached them): wait
            self.stopping = time.monotonic()
        log.error("engine died: %s", exc if isinstance(exc, BackendDeadError) else death)

    def fail(self, why: str) -> None:
        log.error("%s", why)
        self.code = 1
        self.stop(signal.SIGTERM)

    def stop(self, sig: int) -> None:
        """Forward the signal: every API process drains (a second signal: they stop waiting)."""
        if self.stopping is None:
            self.stopping = time.monotonic()
            log.info("%s: draining %d API processes", signal.Signals(sig).name, len(self.procs))
        for proc in self.procs:
            if proc.pid is not None and proc.exitcode is None:
                os.kill(proc.pid, sig)
