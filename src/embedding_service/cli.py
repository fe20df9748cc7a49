"""Command line: `embedding-service serve|prepare [--flag value ...]`, one flag per EmbeddingConfig field,
and `embedding-service embed` (bulk/command.py).

The CLI parses and serves; what runs (model folder, engine, options) is decided in service.py.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from .config import EmbeddingConfig
from .logging_config import configure_logging
from .models_file import ModelsFileError

if TYPE_CHECKING:
    from .service import ServicePlan

__all__ = ["build_parser", "load_settings", "main"]

log = logging.getLogger("embedding_service")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# The commands that take one flag per settings field: (help, description).
SETTINGS_COMMANDS = {
    "serve": ("start the HTTP server",
              "Start the server. Every flag also reads EMBEDDING_<FIELD> from the environment or a .env file; "
              "flags win."),
    "prepare": ("download, convert and load the models once, then exit",
                "Do what `serve` does before it serves: find (or download) each model, convert it (the openvino "
                "engine's export) and load it once; then exit, leaving the caches filled. For image builds and "
                "init containers. Takes serve's flags and variables."),
}


def build_parser(config_cls: type[EmbeddingConfig] = EmbeddingConfig) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedding-service", description="OpenAI-compatible embedding server")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, description) in SETTINGS_COMMANDS.items():
        _add_setting_flags(commands.add_parser(name, help=help_text, description=description), config_cls)
    _add_embed_command(commands, config_cls)
    return parser


def _add_setting_flags(parser: argparse.ArgumentParser, config_cls: type[EmbeddingConfig]) -> None:
    """One flag per settings field; unset flags stay out of the namespace, so env and .env still apply."""
    for name, field in config_cls.model_fields.items():
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or name} [env EMBEDDING_{name.upper()}; default {default}]"
        if field.annotation is bool:
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(_flag(name), default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)


def _add_embed_command(commands: Any, config_cls: type[EmbeddingConfig] = EmbeddingConfig) -> None:
    from .bulk.command import add_embed_arguments

    bulk = commands.add_parser("embed", help="embed files of texts (in this process, on servers or on Ray)",
                               description="Embed txt/jsonl/csv/parquet files into parquet, npy or jsonl: "
                                           "streaming, resumable (rerun the same command after a crash), with "
                                           "the model loaded here, through --url servers, or on --ray. "
                                           "See docs/bulk.md.")
    add_embed_arguments(bulk, config_cls)
    bulk.set_defaults(embed_parser=bulk)  # combinations are checked after parsing, with this parser's usage


def run_embed(args: argparse.Namespace, config_cls: type[EmbeddingConfig] = EmbeddingConfig) -> int:
    from .bulk.command import run_embed as run

    return run(args, lambda overrides: load_settings(overrides, config_cls))


def _describe(error: Any, config_cls: type[EmbeddingConfig] = EmbeddingConfig) -> str:
    field = str(error["loc"][0]) if error.get("loc") else "config"
    info = config_cls.model_fields.get(field)
    shown = "<hidden>" if info is not None and info.repr is False else repr(error.get("input"))  # keys
    return (f"invalid configuration: {field} ({_flag(field)} / EMBEDDING_{field.upper()}) = "
            f"{shown}: {error['msg']}")


def load_settings(overrides: dict[str, Any], config_cls: type[EmbeddingConfig] = EmbeddingConfig) -> EmbeddingConfig:
    """Settings from flags (highest), env, .env and defaults. Exits with one line on an invalid value."""
    try:
        return config_cls(**overrides)
    except ValidationError as exc:
        print(f"embedding-service: {_describe(exc.errors()[0], config_cls)}", file=sys.stderr)
        raise SystemExit(2) from None


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


def _export_settings(settings: EmbeddingConfig, plan: ServicePlan) -> None:
    """Worker processes rebuild the same settings from the environment, with the plan's decisions in it."""
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            os.environ.pop(f"EMBEDDING_{name.upper()}", None)
            continue
        text = json.dumps(value) if isinstance(value, list) else str(value)
        os.environ[f"EMBEDDING_{name.upper()}"] = text
    if settings.models_file is not None:
        return  # each worker reads the file again (the entries name their folders themselves)
    for model, variable in ((plan.embed if settings.serves_embeddings else None, "EMBEDDING_MODEL_PATH"),
                            (plan.rerank, "EMBEDDING_RERANK_MODEL_PATH")):
        if model is not None and model.model_dir:
            os.environ[variable] = model.model_dir
    os.environ["EMBEDDING_DEMO"] = "false"
    os.environ["EMBEDDING_SERVED_MODEL_NAME"] = settings.public_model_name
    if settings.public_rerank_model_name:
        os.environ["EMBEDDING_SERVED_RERANK_MODEL_NAME"] = settings.public_rerank_model_name
    kinds = {model.engine for model in plan.models.values()}
    if len(kinds) == 1:  # `auto` decided once, in the parent (the choice is the same from the same files)
        os.environ["EMBEDDING_ENGINE"] = kinds.pop()


def _worker_main(sock: socket.socket) -> None:
    """A `workers > 1` worker process: the settings the parent exported, one draining server on `sock`."""
    os.setpgid(0, 0)  # the parent forwards signals: a terminal's Ctrl-C must not reach workers twice
    from .backends.base import BackendLoadError
    from .service import plan_service

    settings = EmbeddingConfig()
    configure_logging(settings.log_level, settings.log_format)
    try:
        plan = plan_service(settings)  # the exported folders and engine: nothing is decided again
    except (BackendLoadError, ModelsFileError) as exc:
        sys.exit(_fail(str(exc)))
    sys.exit(_serve_one(settings, plan, sock))


def serve(settings: EmbeddingConfig) -> int:
    from .backends.base import BackendLoadError
    from .service import onednn_cache_for, openmp_waits_for, plan_service

    configure_logging(settings.log_level, settings.log_format)
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
    if settings.workers > 1:
        from .server import listening_socket
        from .supervisor import run_workers

        _export_settings(settings, plan)
        log.info("starting %d worker processes, each loading its own copy of the model", settings.workers)
        return run_workers(settings.workers, lambda: listening_socket(settings), _worker_main,
                           settings.shutdown_timeout)
    return _serve_one(settings, plan)


def prepare(settings: EmbeddingConfig) -> int:
    """`prepare`: plan, build and load every model as a start would (downloads, exports and compile caches
    land where `serve` looks for them), then close them and exit 0; non-zero with the reason otherwise."""
    from .backends.base import BackendLoadError
    from .service import build_engines, plan_service

    configure_logging(settings.log_level, settings.log_format)
    try:
        plan = plan_service(settings)
        engines = build_engines(plan)
    except (BackendLoadError, ImportError, ModelsFileError) as exc:
        return _fail(str(exc))

    async def load_and_close() -> None:
        for engine in engines.values():
            try:
                await engine.start()
            finally:
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


def _serve_one(settings: EmbeddingConfig, plan: ServicePlan, sock: socket.socket | None = None) -> int:
    """One server process: build the planned engines and the app, serve until drained (on `sock` when given)."""
    from .api.app import create_app
    from .api.served import Served
    from .backends.base import BackendDeadError, BackendLoadError
    from .server import DrainingServer, freeze_startup_heap, uvicorn_config
    from .service import build_engines

    failures: list[BaseException] = []
    server: DrainingServer | None = None

    def fatal(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    try:
        engines = build_engines(plan)
    except (BackendLoadError, ImportError) as exc:
        return _fail(str(exc))
    models = [Served(name, engines[name], model.role, model.aliases) for name, model in plan.models.items()]
    try:
        app = create_app(settings, models=models, on_fatal=fatal, on_loaded=freeze_startup_heap)
    except (RuntimeError, ValueError) as exc:  # a setting that cannot be honoured (token_ids_tiktoken
        return _fail(str(exc))  # offline; a malformed line in the API key file)
    server = DrainingServer(uvicorn_config(app, settings), list(engines.values()), settings.shutdown_timeout)
    log.info("serving %s on http://%s:%d", ", ".join(f"{m.name} ({m.task})" for m in models), settings.host,
             settings.port)
    try:
        server.run(None if sock is None else [sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: exit quietly
        return 130
    if failures:
        what = "engine died" if isinstance(failures[0], BackendDeadError) else "model load failed"
        return _fail(f"{what}: {failures[0]}")
    return 0


def main(argv: Sequence[str] | None = None, config_cls: type[EmbeddingConfig] = EmbeddingConfig) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0].startswith("-") and args_list[0] not in ("-h", "--help")):
        args_list.insert(0, "serve")  # `embedding-service --demo` means serve
    args = build_parser(config_cls).parse_args(args_list)
    if args.command == "embed":
        from .bulk.command import check_combinations

        check_combinations(args.embed_parser, args)
        return run_embed(args, config_cls)
    if args.command not in SETTINGS_COMMANDS:
        build_parser(config_cls).print_help()
        return 2
    overrides = {key: value for key, value in vars(args).items() if key != "command"}
    settings = load_settings(overrides, config_cls)
    return prepare(settings) if args.command == "prepare" else serve(settings)
