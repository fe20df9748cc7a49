"""`embed --ray`: the same job on a Ray cluster with Ray Data.

Read: a Datasource whose read tasks are runs of the plan's chunks (the same rows, ids and checks as in-process).
Embed: `map_batches` on an actor pool; each actor holds one engine built from the same settings, and embeds each
chunk with the same deterministic batches. Write: the driver streams the results in order (preserve_order) into
the same resumable parts and final file, so --ray output equals in-process output and resumes the same way.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import EmbeddingConfig
from ..service import build_embedding_engine, plan_model
from .local import BulkRowError, EmbedOptions, embed_texts
from .lock import WorkLock
from .progress import Progress
from .readers import BulkInputError, Chunk, ChunkReader, ChunkSpec, Plan
from .runner import Job, JobState, Summary, locked_output

__all__ = ["RayOptions", "ray_fingerprint", "run_on_ray", "start_ray"]

log = logging.getLogger("embedding_service")

_INPUT_ERROR = re.compile(r"BulkInputError: (.+)")


@dataclass(frozen=True)
class RayOptions:
    address: str  # "local" starts one in this process; else ray.init's address ("auto", "ray://head:10001")
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0


def ray_fingerprint(settings: EmbeddingConfig, options: EmbedOptions) -> dict[str, Any]:
    # The model is resolved on the workers (the driver may not hold it): settings, not a local path.
    return {"mode": "ray", "model": settings.public_model_name, "model_source": settings.model_source,
            "demo": settings.demo, "engine": settings.engine, "dtype": settings.dtype, "device": settings.device,
            "max_model_len": settings.max_model_len, "truncate": settings.truncate,
            "max_batch_size": settings.max_batch_size, "max_batch_tokens": settings.max_batch_tokens,
            "instruction": options.instruction, "prompt_name": options.prompt_name,
            "dimensions": options.dimensions}


def _chunk_table(chunk: Chunk) -> pa.Table:
    n = len(chunk.texts)
    return pa.table({"chunk": pa.array([chunk.spec.index] * n, pa.int64()), "row": pa.array(chunk.rows, pa.int64()),
                     "id": chunk.ids, "text": pa.array(chunk.texts, pa.string())})


def _read_chunks(plan: Plan, specs: list[ChunkSpec]) -> Iterator[pa.Table]:
    reader = ChunkReader(plan)  # one cursor for the run: each file is streamed once
    for spec in specs:
        yield _chunk_table(reader.read(spec))


def _datasource(plan: Plan, specs: list[ChunkSpec]) -> Any:
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ChunkSource(Datasource):  # type: ignore[misc]
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            # Runs of consecutive chunks of one file, about `parallelism` of them in all.
            per_task = max(1, -(-len(specs) // max(parallelism, 1)))
            runs: list[list[ChunkSpec]] = []
            for spec in specs:
                if runs and runs[-1][-1].file == spec.file and len(runs[-1]) < per_task:
                    runs[-1].append(spec)
                else:
                    runs.append([spec])
            tasks = []
            for run in runs:
                meta = BlockMetadata(num_rows=sum(s.stop - s.start for s in run), size_bytes=None, exec_stats=None,
                                     input_files=(str(plan.files[run[0].file].path),))
                tasks.append(ReadTask(functools.partial(_read_chunks, plan, run), meta))
            return tasks

    return ChunkSource()


class EmbedActor:
    """One engine per actor; each chunk in a batch is embedded on its own, as in-process."""

    def __init__(self, settings_json: str, options: EmbedOptions, plan: Plan) -> None:
        import asyncio

        settings = EmbeddingConfig.model_validate_json(settings_json)
        self.options, self.plan = options, plan
        self.engine = build_embedding_engine(plan_model(settings))  # resolved here: the driver may not hold the model
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.engine.start())

    def __call__(self, batch: pa.Table) -> pa.Table:
        chunks = batch.column("chunk").to_pylist()
        texts = batch.column("text").to_pylist()
        outputs = []
        start = 0
        while start < len(chunks):
            stop = start
            while stop < len(chunks) and chunks[stop] == chunks[start]:
                stop += 1
            try:
                vectors, lengths = embed_texts(self.engine, texts[start:stop], self.options)
            except BulkRowError as exc:
                spec = self.plan.chunks[chunks[start]]
                row = batch.column("row")[start + exc.index].as_py()
                raise BulkInputError(f"{self.plan.files[spec.file].row_name(row)}: {exc.message}") from None
            part = batch.slice(start, stop - start)
            flat = pa.array(vectors.reshape(-1), pa.float32())
            part = part.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
            outputs.append(part.append_column("tokens", pa.array(lengths, pa.int64())))
            start = stop
        return pa.concat_tables(outputs) if outputs else batch


# Read when ray is imported. Set to 0, Ray takes this machine for a laptop (its default on macOS and Windows): the
# node's address is 127.0.0.1 and every service binds it, instead of the address routed to the internet and `::`.
# A `--ray local` cluster is one node inside this process: nothing outside the machine needs to reach it.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = "127.0.0.1"


def start_ray(address: str) -> Any:
    if address == "local":
        os.environ[LOCAL_ONLY_ENV] = "0"
    import ray

    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("ray").setLevel(logging.WARNING)  # Ray Data's plan and stats lines; ours say enough
    if address != "local":
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return ray
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, _node_ip_address=LOOPBACK)
    node = ray.util.get_node_ip_address()
    if node != LOOPBACK:  # ray was imported before the setting above, in this process
        ray.shutdown()
        raise RuntimeError(f"--ray local: Ray started on {node}, not {LOOPBACK}; set {LOCAL_ONLY_ENV}=0 before "
                           "ray is imported")
    return ray


def run_on_ray(job: Job, settings: EmbeddingConfig, options: EmbedOptions, ray_options: RayOptions) -> Summary:
    started = time.monotonic()
    with locked_output(job) as (fmt, lock):  # the driver writes the output: it holds the lock
        return _run_locked(job, settings, options, ray_options, fmt, lock, started)


def _run_locked(job: Job, settings: EmbeddingConfig, options: EmbedOptions, ray_options: RayOptions, fmt: str,
                lock: WorkLock, started: float) -> Summary:
    plan, _ = job.plan()
    fingerprint = {**plan.fingerprint(), **ray_fingerprint(settings, options), **job.output_fingerprint(fmt)}
    state = JobState(job, fmt, fingerprint, lock)
    if state.complete:
        return state.summary(time.monotonic() - started, 0)
    specs = list(plan.chunks[state.parts_done:])
    new_rows = 0
    if specs:
        ray = start_ray(ray_options.address)
        try:
            new_rows = _run(ray, job, plan, state, specs, settings, options, ray_options)
        except Exception as exc:  # Ray wraps a worker's error (RayTaskError, UserCodeException) in its traceback
            found = _INPUT_ERROR.findall(str(exc))
            if found:
                raise BulkInputError(found[-1].strip()) from None
            raise RuntimeError(f"the Ray job failed: {type(exc).__name__}: {_last_line(exc)}") from None
        finally:
            ray.shutdown()
    state.finish()
    return state.summary(time.monotonic() - started, new_rows)


def _run(ray: Any, job: Job, plan: Plan, state: JobState, specs: list[ChunkSpec], settings: EmbeddingConfig,
         options: EmbedOptions, ray_options: RayOptions) -> int:
    import ray.data

    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # set up by its import; quiet its plan lines
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # results in input order, for the ordered parts
    context.enable_progress_bars = False  # ours is on the driver
    dataset = ray.data.read_datasource(_datasource(plan, specs), override_num_blocks=max(len(specs), 1))
    embedded = dataset.map_batches(
        EmbedActor, batch_size=None, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=ray_options.actors),
        num_cpus=ray_options.cpus_per_actor, num_gpus=ray_options.gpus_per_actor or None,
        fn_constructor_kwargs={"settings_json": settings.model_dump_json(), "options": options, "plan": plan})
    progress = Progress(plan.total_rows, state.rows_in_done, bar=job.progress, log_every_s=job.log_every_s)
    reader = ChunkReader(plan)  # only for chunks whose every row was skipped (no block comes back for them)
    next_chunk, new_rows = specs[0].index, 0
    pending: list[pa.Table] = []

    def write_through(upto: int) -> None:
        """Write parts for chunks next_chunk..upto-1 from what has arrived (all their rows have)."""
        nonlocal next_chunk, new_rows, pending
        table = pa.concat_tables(pending) if pending else None
        while next_chunk < upto:
            spec = plan.chunks[next_chunk]
            if table is not None:
                mask = np.asarray(table.column("chunk").to_numpy()) == next_chunk
                rows = table.filter(pa.array(mask))
            else:
                rows = None
            if rows is None or rows.num_rows == 0:
                chunk, vectors, tokens = reader.read(spec), np.zeros((0, 0), np.float32), 0
                if chunk.texts:
                    raise RuntimeError(f"chunk {spec.index}: no vectors came back from Ray")
            else:
                chunk = Chunk(spec, rows.column("text").to_pylist(), rows.column("id").combine_chunks(),
                              rows.column("row").to_pylist())
                column = rows.column("embedding").combine_chunks()
                vectors = column.values.to_numpy(zero_copy_only=False).reshape(rows.num_rows, column.type.list_size)
                tokens = int(pc.sum(rows.column("tokens")).as_py() or 0)
            state.add_part(chunk, vectors, tokens)
            progress.update(spec.stop - spec.start)
            new_rows += len(chunk.texts)
            next_chunk += 1
        if table is not None:
            rest = table.filter(pc.greater_equal(table.column("chunk"), upto))
            pending = [rest] if rest.num_rows else []

    try:
        for batch in embedded.iter_batches(batch_size=None, batch_format="pyarrow"):
            if not batch.num_rows:
                continue
            pending.append(batch)
            # Rows arrive in order: every chunk before this batch's first is complete.
            write_through(int(batch.column("chunk")[0].as_py()))
        write_through(plan.chunks[-1].index + 1)
    finally:
        progress.close()
        reader.close()
    return new_rows


def _last_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
