"""Command line: `embedding-service serve|prepare [--flag value ...]`, one flag per EmbeddingConfig field,
and `embedding-service embed` (bulk/command.py).

The CLI parses and hands the settings to the composition root (assembly.py: serve, prepare), which decides
what runs once (service.py's plan) and builds it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from .config import EmbeddingConfig

if TYPE_CHECKING:
    pass

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
    from .assembly import prepare, serve

    return prepare(settings) if args.command == "prepare" else serve(settings)
