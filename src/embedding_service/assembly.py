"""The composition root: settings become a plan once (service.py: each model's folder, facts, engine and
options), and the plan becomes engines, the app and the server. `serve` and `prepare` are the CLI's commands;
with `workers > 1` every worker process gets the decided plan itself (pickled by multiprocessing), so nothing
is decided twice.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import sys
from collections.abc import Callable

from . import tracing
from .backends.base import BackendDeadError, BackendLoadError
from .config import EmbeddingConfig
from .engine.core import EngineCore
from .engine.loading import load_models
from .logging_config import configure_logging
from .models_file import ModelsFileError
from .service import ServicePlan, build_engines, model_loads, onednn_cache_for, openmp_waits_for, plan_service

__all__ = ["prepare", "serve", "serve_planned"]

log = logging.getLogger("embedding_service")


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _fail(message: str, code: int = 1) -> int:
    print(f"embedding-service: {message}", file=sys.stderr)
    return code


def _worker_main(sock: socket.socket, settings: EmbeddingConfig, plan: ServicePlan) -> None:
    """A `workers > 1` worker process: the parent's settings and plan (nothing is decided again), one draining
    server on `sock`."""
    os.setpgid(0, 0)  # the parent forwards signals: a terminal's Ctrl-C must not reach workers twice
    configure_logging(settings.log_level, settings.log_format)
    sys.exit(serve_planned(settings, plan, sock))


def _api_process_main(sock: socket.socket, path: str, index: int, ready_first: bool, settings: EmbeddingConfig,
                      plan: ServicePlan) -> None:
    """An `api_processes > 1` API process: a draining server on `sock` whose engines are the engine process's
    (over the Unix socket at `path`); with `ready_first`, it accepts connections only once they are ready."""
    from .api_processes import remote_engines

    os.setpgid(0, 0)  # the engine process forwards signals: a terminal's Ctrl-C must not reach us twice
    configure_logging(settings.log_level, settings.log_format)
    sys.exit(serve_planned(settings, plan, sock, engines=functools.partial(remote_engines, path=path),
                           ready_first=ready_first))


def _serve_api_processes(settings: EmbeddingConfig, plan: ServicePlan) -> int:
    from .api_processes import run_api_processes, unsupported
    from .server import listening_sockets

    if (why := unsupported(settings, plan)) is not None:
        return _fail(why, 2)
    try:
        return run_api_processes(settings.api_processes, plan,
                                 lambda: listening_sockets(settings.host, settings.port, settings.api_processes),
                                 functools.partial(_api_process_main, settings=settings, plan=plan),
                                 settings.shutdown_timeout)
    except (BackendLoadError, ImportError) as exc:
        return _fail(str(exc))


def serve(settings: EmbeddingConfig) -> int:
    """`serve`: decide the plan once, set the CPU runtime's knobs it calls for, then serve it in this process
    or in `workers` processes (each given the same plan)."""

    configure_logging(settings.log_level, settings.log_format)
    if settings.otlp_endpoint and (reason := tracing.missing()):  # before any model loads
        return _fail(reason)
    if _port_in_use(settings.host, settings.port):
        return _fail(f"port {settings.port} on {settings.host} is already in use (Address already in use); "
                     "choose another with --port or EMBEDDING_PORT")
    try:
        plan = plan_service(settings)
    except ModelsFileError as exc:
        return _fail(str(exc), 2)
    except BackendLoadError as exc:
        return _fail(str(exc))
    engines = [model.engine for model in plan.models.values()]
    chosen = {**openmp_waits_for(engines), **onednn_cache_for(engines)}
    os.environ.update(chosen)  # before torch is imported (it loads OpenMP) and before the first kernel
    if chosen:
        log.info("CPU runtime settings: %s", " ".join(f"{k}={v}" for k, v in chosen.items()))
    if settings.api_processes > 1:
        return _serve_api_processes(settings, plan)
    if settings.workers > 1:
        from .server import listening_sockets
        from .supervisor import run_workers

        log.info("starting %d worker processes, each loading its own copy of the models", settings.workers)
        return run_workers(settings.workers, lambda: listening_sockets(settings.host, settings.port, settings.workers),
                           functools.partial(_worker_main, settings=settings, plan=plan), settings.shutdown_timeout)
    return serve_planned(settings, plan)


def prepare(settings: EmbeddingConfig) -> int:
    """`prepare`: plan, build and load every model as a start would (downloads, exports and compile caches
    land where `serve` looks for them), then close them and exit 0; non-zero with the reason otherwise."""

    configure_logging(settings.log_level, settings.log_format)
    try:
        plan = plan_service(settings)
        engines = build_engines(plan)
    except (BackendLoadError, ImportError, ModelsFileError) as exc:
        return _fail(str(exc))

    async def load_and_close() -> None:
        try:
            await load_models(model_loads(plan, engines))
        finally:
            for engine in engines.values():
                await engine.stop()

    try:
        asyncio.run(load_and_close())
    except Exception as exc:  # a load failure of any kind: one line, as serve reports it
        return _fail(f"model load failed: {exc}")
    for name, model in plan.models.items():
        engine = engines[name]
        print(f"embedding-service: {model.role} model ready: {model.model_dir or name} on the {model.engine} engine "
              f"as '{name}' (loaded in {engine.load_seconds or 0:.1f} s)")
    return 0


def serve_planned(settings: EmbeddingConfig, plan: ServicePlan, sock: socket.socket | None = None, *,
                  engines: Callable[[ServicePlan], dict[str, EngineCore]] = build_engines,
                  ready_first: bool = False) -> int:
    """One server process: build the planned engines (`engines(plan)`: the models here, or an API process's
    proxies of the engine process's) and the app, serve until drained (on `sock` when given; with
    `ready_first`, accepting only once the engines are ready)."""
    from .api.app import create_app
    from .api.served import Served
    from .server import DrainingServer, freeze_startup_heap, uvicorn_config

    failures: list[BaseException] = []
    server: DrainingServer | None = None

    def fatal(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    def exit_status() -> int:  # (also when the server must exit with a load still in its thread)
        if not failures:
            return 0
        what = "engine died" if isinstance(failures[0], BackendDeadError) else "model load failed"
        return _fail(f"{what}: {failures[0]}")

    try:
        built = engines(plan)
    except (BackendLoadError, ImportError) as exc:
        return _fail(str(exc))
    models = [Served(name, built[name], model.role, model.aliases, model.loads_alone)
              for name, model in plan.models.items()]
    if settings.otlp_endpoint:  # in each worker process: the exporter's thread does not survive a fork
        try:
            tracing.configure(settings.otlp_endpoint, settings.otlp_service_name, settings.trace_sample_ratio)
        except ImportError as exc:
            return _fail(str(exc))
    try:
        app = create_app(settings, models=models, on_fatal=fatal, on_loaded=freeze_startup_heap,
                         load_before_serving=ready_first)
    except (RuntimeError, ValueError) as exc:  # a setting that cannot be honoured (token_ids_tiktoken
        return _fail(str(exc))  # offline; a malformed line in the API key file)
    server = DrainingServer(uvicorn_config(app, settings), list(built.values()), settings.shutdown_timeout,
                            exit_status=exit_status)
    log.info("serving %s on http://%s:%d", ", ".join(f"{m.name} ({m.task})" for m in models), settings.host,
             settings.port)
    try:
        server.run(None if sock is None else [sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: exit quietly
        return 130
    finally:
        tracing.shutdown()
    return exit_status()
