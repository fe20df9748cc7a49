"""`embedding-service embed`: its flags (checked at parse time) and running the job they describe."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["BUSY_EXIT", "ENGINE_FIELDS", "add_embed_arguments", "run_embed"]

BUSY_EXIT = 75  # EX_TEMPFAIL: another run holds the output; a retry wrapper can tell it from a failure

log = logging.getLogger("embedding_service")

# The settings of `serve` that decide the vectors (and the fake engine's fault knobs, for tests): in-process
# bulk takes them from the same flags and EMBEDDING_* variables, so it embeds exactly as the server would.
ENGINE_FIELDS = ("model_name", "model_path", "demo", "served_model_name", "engine", "device", "dtype",
                 "max_model_len", "max_batch_size", "max_batch_tokens", "truncate", "matryoshka_models",
                 "enforce_eager", "torch_compile", "vllm_engine_core", "prefix_caching", "batch_invariant",
                 "quantize", "openvino_cache_dir", "gpu_memory_utilization", "tensor_parallel_size",
                 "log_level", "fake_delay_ms", "fake_fail_batches", "fake_die_after")


def _number(kind: type, low: float, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


_positive = _number(int, 1, "at least 1")


def add_embed_arguments(bulk: argparse.ArgumentParser, config_cls: Any) -> None:
    bulk.add_argument("inputs", nargs="*", metavar="INPUT",
                      help=".txt (one text per line), .jsonl, .csv or .parquet files, folders or globs")
    bulk.add_argument("-o", "--output", type=Path, required=True,
                      help=".parquet (id, embedding[, text]), .npy (vectors) or .jsonl to write")
    batch = bulk.add_argument_group("an OpenAI batch input file instead of INPUT (docs/batch.md)")
    batch.add_argument("--batch-file", type=Path, default=None, metavar="REQUESTS.jsonl",
                       help="run this Batch API input file's requests; -o gets the batch output file (.jsonl)")
    batch.add_argument("--error-file", type=Path, default=None, metavar="PATH",
                       help="where failed requests go [default: beside -o, <name>.errors.jsonl]")
    data = bulk.add_argument_group("input and output")
    data.add_argument("--column", default="text", help="the text column (jsonl field) [default text]")
    data.add_argument("--id-column", default=None, help="a column kept beside each vector as its id "
                                                       "(default: the row's position in the input)")
    data.add_argument("--skip-empty", action="store_true", help="skip null, missing and empty texts "
                                                               "(default: stop, naming the row)")
    data.add_argument("--include-text", action="store_true", help="write each text beside its vector")
    data.add_argument("--vector-type", choices=["float", "int8", "uint8", "binary", "ubinary"], default="float",
                      help="the vectors written: float32, or as /v1/embeddings' encoding_format of that name "
                           "(docs/clients.md) [default float]")
    data.add_argument("--chunk-rows", type=_positive, default=8192,
                      help="rows per chunk: the unit written, resumed and sorted into batches [default 8192]")
    data.add_argument("--overwrite", action="store_true", help="discard an existing output or unfinished run")
    data.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress bar (default: on a terminal; otherwise log lines)")
    data.add_argument("--log-every", type=_number(float, 0.1, "at least 0.1"), default=30.0, metavar="SECONDS",
                      help="seconds between progress log lines when there is no bar [default 30]")
    request = bulk.add_argument_group("what to embed")
    request.add_argument("--instruction", default=None, help="Qwen3 query instruction for every text")
    request.add_argument("--prompt-name", default=None, help="the model's sentence-transformers prompt")
    request.add_argument("--dimensions", type=_positive, default=None, help="Matryoshka: keep this many")
    request.add_argument("--task", choices=["embed", "sparse", "multivector"], default=None,
                         help="what the model in this process gives, as a models file's task: [default: what its "
                              "folder says (a sentence-transformers SparseEncoder: sparse; PyLate: multivector; "
                              "else embed)]; e.g. sparse for a bare BertForMaskedLM SPLADE folder")
    request.add_argument("--input-type", choices=["search_query", "search_document"], default=None,
                         help="a sparse or multi-vector model's side (as the online input_type) [default: the "
                              "model's: a SPLADE model's encode, a ColBERT model's query]")
    remote = bulk.add_argument_group("running servers (instead of loading the model here)")
    remote.add_argument("--url", action="append", default=None,
                        help="server base URL, e.g. http://host:8890/v1; repeat for several servers "
                             "[env EMBEDDING_URL, comma-separated]")
    remote.add_argument("--api-key", default=os.environ.get("EMBEDDING_API_KEY"), help="[env EMBEDDING_API_KEY]")
    remote.add_argument("--model", default=None, help="model name sent in requests [default: the server's]")
    remote.add_argument("--batch-size", type=_positive, default=64, help="texts per request [default 64]")
    remote.add_argument("--concurrency", type=_positive, default=None,
                        help="requests in flight per server [4; with --batch-file, batch_concurrency: 64]")
    remote.add_argument("--retries", type=_number(int, 0, "0 or more"), default=8,
                        help="retries of a request (connection errors, timeouts, 429, 503) [default 8]")
    remote.add_argument("--timeout", type=_number(float, 0.1, "at least 0.1"), default=300.0,
                        help="seconds per request [default 300]")
    ray = bulk.add_argument_group("Ray (see docs/bulk.md)")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run on a Ray cluster (ADDRESS, e.g. ray://head:10001 or auto); `local` starts one")
    ray.add_argument("--ray-actors", type=_positive, default=1, help="actors, each holding one engine [1]")
    ray.add_argument("--ray-cpus-per-actor", type=_number(float, 0.0, "0 or more"), default=1.0)
    ray.add_argument("--ray-gpus-per-actor", type=_number(float, 0.0, "0 or more"), default=0.0)
    engine = bulk.add_argument_group("the model in this process (the same flags and EMBEDDING_* as serve)")
    for name in ENGINE_FIELDS:
        field = config_cls.model_fields[name]
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or name} [env EMBEDDING_{name.upper()}]"
        if field.annotation is bool:
            engine.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            engine.add_argument(flag, default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)


def _urls(args: argparse.Namespace) -> list[str]:
    if args.url:
        return list(args.url)
    env = os.environ.get("EMBEDDING_URL", "")
    return [u.strip() for u in env.split(",") if u.strip()]


def check_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Nonsense combinations, refused before anything runs."""
    given = [name for name in ENGINE_FIELDS if name in vars(args) and name != "log_level"]
    if args.batch_file is not None and args.inputs:
        parser.error("give INPUT files of texts or one --batch-file of requests, not both")
    if args.batch_file is None and not args.inputs:
        parser.error("the following arguments are required: INPUT (or --batch-file)")
    if args.batch_file is not None:
        texts_only = [flag for flag, value in (("--instruction", args.instruction), ("--prompt-name", args.prompt_name),
                                               ("--dimensions", args.dimensions), ("--model", args.model),
                                               ("--id-column", args.id_column))
                      if value is not None]
        texts_only += [flag for flag, on in (("--include-text", args.include_text), ("--skip-empty", args.skip_empty),
                                             ("--vector-type", args.vector_type != "float")) if on]
        if texts_only:
            parser.error(f"{texts_only[0]} is for INPUT files of texts; with --batch-file each line's body says what "
                         "to embed and how")
    if _urls(args) and args.ray:
        parser.error("--ray runs the model in Ray actors; it does not take --url")
    if _urls(args) and given:
        parser.error(f"--{given[0].replace('_', '-')} sets up the model in this process; with --url the "
                     "servers' own settings apply")
    for flag in ("task", "input_type"):
        if (_urls(args) or args.ray) and getattr(args, flag):
            parser.error(f"--{flag.replace('_', '-')} is for a model in this process (not --url or --ray)")
    if not _urls(args) and args.model:
        parser.error("--model names the model in requests to --url servers; for the model here use --model-name")


def run_embed(args: argparse.Namespace, load_settings: Callable[[dict[str, Any]], Any]) -> int:
    from ..backends.base import BackendLoadError
    from ..errors import ServiceError

    try:
        from .local import EmbedOptions, LocalEmbedder
        from .lock import OutputBusy
        from .manifest import FingerprintMismatch
        from .readers import BulkInputError
        from .remote import HttpEmbedder, RemoteError
        from .runner import Job, run_job
    except ImportError as exc:
        return _fail(f"{exc.name or exc} is missing: pip install 'embedding-service[bulk]'")

    job = Job(inputs=args.inputs, output=args.output, column=args.column, id_column=args.id_column,
              skip_empty=args.skip_empty, chunk_rows=args.chunk_rows, include_text=args.include_text,
              overwrite=args.overwrite, progress=args.progress, log_every_s=args.log_every,
              vector_type=args.vector_type)
    options = EmbedOptions(args.instruction, args.prompt_name, args.dimensions, args.input_type)
    urls = _urls(args)
    settings = load_settings({k: v for k, v in vars(args).items() if k in ENGINE_FIELDS})
    from ..logging_config import configure_logging

    configure_logging(settings.log_level, "text")
    try:
        summary: Any
        if args.batch_file is not None:
            from .batch_file import run_batch_file_command

            summary = run_batch_file_command(args, settings, urls)
        elif args.ray:
            from .ray_runner import RayOptions, run_on_ray

            summary = run_on_ray(job, settings, options, RayOptions(args.ray, args.ray_actors,
                                                                    args.ray_cpus_per_actor, args.ray_gpus_per_actor))
        else:
            embedder: Any
            if urls:
                embedder = HttpEmbedder(urls, options, api_key=args.api_key, model=args.model,
                                        batch_size=args.batch_size, concurrency=args.concurrency or 4,
                                        retries=args.retries, timeout_s=args.timeout)
            else:
                # torch keeps OpenMP's default wait policy here (serve makes it passive): with no server threads
                # to share the cores with, passive threads made 20,000 short texts 5-13% slower (bench/RESULTS.md).
                embedder = LocalEmbedder(settings, options, task=args.task)
            summary = asyncio.run(run_job(job, embedder))
    except OutputBusy as exc:
        return _fail(str(exc), BUSY_EXIT)
    except (BulkInputError, FingerprintMismatch, RemoteError, BackendLoadError, ValueError, OSError,
            RuntimeError) as exc:  # a failed Ray job, a model that did not load: one line
        return _fail(str(exc))
    except ServiceError as exc:
        return _fail(exc.message)
    except KeyboardInterrupt:
        return _fail("interrupted; run the same command again to continue where it stopped", 130)
    print(summary.line(), file=sys.stderr)
    return 0


def _fail(message: str, code: int = 1) -> int:
    print(f"embedding-service: embed: {message}", file=sys.stderr)
    return code
