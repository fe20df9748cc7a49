"""A bulk job: lock the output, plan the input, embed chunk by chunk (resuming), join the parts.

Memory is bounded by the chunks in flight (pipeline_depth x chunk_rows texts and vectors), not the input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from .local import BulkRowError
from .lock import WorkLock
from .manifest import FingerprintMismatch, Manifest, PartRecord, describe_mismatch, work_dir
from .ordered import InOrder
from .progress import Progress
from .readers import BulkInputError, Chunk, ChunkReader, Plan, expand_inputs, scan
from .writers import (
    BULK_VECTOR_TYPES,
    count_rows,
    finalize,
    output_format,
    part_table,
    read_fingerprint,
    write_part,
)

__all__ = ["Embedder", "Job", "JobState", "Summary", "locked_output", "run_job"]

log = logging.getLogger("embedding_service")


class Embedder(Protocol):
    pipeline_depth: int
    dimension: int | None

    @property
    def shaped(self) -> bool:
        """Vectors as a nested column (sparse, token vectors: bulk/tasks.py) rather than a float32 matrix."""
        ...

    def fingerprint(self) -> dict[str, Any]: ...
    async def start(self) -> None: ...
    async def embed(self, texts: list[str], on_progress: Any) -> tuple[np.ndarray | pa.Array, int]: ...
    async def close(self) -> None: ...


@dataclass
class Job:
    inputs: list[str]
    output: Path
    column: str = "text"
    id_column: str | None = None
    skip_empty: bool = False
    chunk_rows: int = 8192
    include_text: bool = False
    overwrite: bool = False
    progress: bool | None = None  # None: a bar on a terminal, log lines otherwise
    log_every_s: float = 30.0
    vector_type: str = "float"  # the output's vectors: float, int8, uint8, binary or ubinary (vector_types.py)

    def output_fingerprint(self, fmt: str) -> dict[str, Any]:
        """What the output depends on beside the vectors (a float job's as before typed vectors, so that its
        unfinished runs resume)."""
        typed = {"vector_type": self.vector_type} if self.vector_type != "float" else {}
        return {"output": fmt, "include_text": self.include_text, **typed}

    def check(self) -> str:
        """The output's format, after the checks that need no file read."""
        fmt = output_format(self.output)
        if self.vector_type not in BULK_VECTOR_TYPES:
            raise ValueError(f"--vector-type must be one of {', '.join(BULK_VECTOR_TYPES)}, got {self.vector_type!r}")
        if fmt == "npy" and self.skip_empty:
            raise ValueError("--skip-empty with a .npy output would lose which rows were skipped; write .parquet "
                             "or .jsonl (they keep ids)")
        if not self.output.parent.is_dir():
            raise ValueError(f"output folder {self.output.parent} does not exist")
        return fmt

    def plan(self) -> tuple[Plan, str]:
        """Cheap checks and the input plan, before any model is loaded."""
        fmt = self.check()
        paths = expand_inputs(self.inputs)
        if self.output.resolve() in paths:
            raise ValueError(f"output {self.output} is also an input")
        plan = scan(paths, column=self.column, id_column=self.id_column, skip_empty=self.skip_empty,
                    chunk_rows=self.chunk_rows)
        if not plan.total_rows:
            raise BulkInputError(f"no rows to embed in {', '.join(str(p) for p in paths[:3])}"
                                 f"{' ...' if len(paths) > 3 else ''} (empty input)")
        return plan, fmt


@dataclass
class Summary:
    rows: int
    skipped: int
    tokens: int
    seconds: float
    new_rows: int  # embedded by this run (a resumed run did the rest before)
    output: Path
    already_done: bool = False

    def line(self) -> str:
        if self.already_done:
            return f"embedding-service embed: {self.output} is already complete ({self.rows} rows); nothing to do"
        rate = self.new_rows / max(self.seconds, 1e-9)
        extra = f"; {self.skipped} empty rows skipped" if self.skipped else ""
        if self.new_rows != self.rows:
            extra += f"; {self.rows - self.new_rows} rows were done before (resumed)"
        return (f"embedding-service embed: {self.rows} rows, {self.tokens} tokens in {self.seconds:.1f}s "
                f"({rate:.1f} texts/s) -> {self.output}{extra}")


@contextlib.contextmanager
def locked_output(job: Job) -> Iterator[tuple[str, WorkLock]]:
    """The output's format and its lock, held until the job ends: taken before the input scan, so a second run
    on a busy output is refused at once (OutputBusy)."""
    fmt = job.check()
    lock = WorkLock.acquire(work_dir(job.output), job.output)
    try:
        yield fmt, lock
    finally:
        lock.release()


class JobState:
    """The output path: work folder, manifest and parts; shared by the in-process and Ray runners. Every change
    to the folder and the output happens under `lock`, the folder's removal at the end included."""

    def __init__(self, job: Job, fmt: str, fingerprint: dict[str, Any], lock: WorkLock) -> None:
        self.job, self.fmt, self.fingerprint, self.lock = job, fmt, fingerprint, lock
        self.folder = lock.folder
        self.complete = False
        if job.overwrite:
            job.output.unlink(missing_ok=True)
            lock.clear()
        manifest_path = self.folder / "manifest.json"
        if manifest_path.is_file():
            manifest = Manifest.load(manifest_path)
            if manifest.fingerprint != fingerprint and not manifest.valid_parts(self.folder):
                manifest = Manifest(fingerprint)  # nothing was done: nothing to mix, start afresh
                lock.clear()
                manifest.save(manifest_path)
            if manifest.fingerprint != fingerprint:
                changed = describe_mismatch(manifest.fingerprint, fingerprint)
                raise FingerprintMismatch(
                    f"{self.folder} holds a run with other settings ({changed}); "
                    "rerun the original command to finish it, or pass --overwrite to start again")
            manifest.parts = manifest.parts[: manifest.valid_parts(self.folder)]
        elif job.output.exists():
            if read_fingerprint(job.output) == fingerprint:
                self.complete = True
                manifest = Manifest(fingerprint)
            else:
                raise FingerprintMismatch(f"{job.output} already exists (from another job or other settings); "
                                          "pass --overwrite to replace it, or choose another -o")
        else:
            manifest = Manifest(fingerprint)
            manifest.save(manifest_path)
        self.manifest = manifest

    @property
    def parts_done(self) -> int:
        return len(self.manifest.parts)

    @property
    def rows_in_done(self) -> int:
        return sum(p.rows_in for p in self.manifest.parts)

    def add_part(self, chunk: Chunk, vectors: np.ndarray | pa.Array, tokens: int) -> None:
        """Write the next part, then record it (a kill between the two redoes this chunk)."""
        manifest = self.manifest
        if chunk.spec.index != len(manifest.parts):
            raise AssertionError(f"chunk {chunk.spec.index} written out of order")
        if len(chunk.texts) and isinstance(vectors, np.ndarray):
            dim, id_type = int(vectors.shape[1]), str(chunk.ids.type)
            if manifest.dimension not in (None, dim):
                raise BulkInputError(f"vectors changed dimension from {manifest.dimension} to {dim} mid-job")
            if manifest.id_type not in (None, id_type):
                raise BulkInputError(f"{self._where(chunk)}: ids are {id_type}, earlier rows' ids are "
                                     f"{manifest.id_type}; ids must have one type")
            manifest.dimension, manifest.id_type = dim, id_type
        table = part_table(chunk.ids, vectors, chunk.texts if self.job.include_text else None)
        size = write_part(self.folder, chunk.spec.index, table)
        manifest.parts.append(PartRecord(rows_in=chunk.spec.stop - chunk.spec.start, rows_out=len(chunk.texts),
                                         tokens=tokens, bytes=size))
        manifest.save(self.folder / "manifest.json")

    def _where(self, chunk: Chunk) -> str:
        return f"chunk {chunk.spec.index} (rows {chunk.spec.start}-{chunk.spec.stop - 1})"

    def finish(self) -> None:
        finalize(self.folder, self.manifest, self.job.output, self.fmt, self.fingerprint, self.job.vector_type)
        self.lock.remove()  # still locked until the folder is gone: no run can join it in between

    def summary(self, seconds: float, new_rows: int) -> Summary:
        parts = self.manifest.parts
        if self.complete:
            return Summary(count_rows(self.job.output), 0, 0, seconds, 0, self.job.output, already_done=True)
        return Summary(sum(p.rows_out for p in parts), sum(p.rows_in - p.rows_out for p in parts),
                       sum(p.tokens for p in parts), seconds, new_rows, self.job.output)


def check_shaped(job: Job, fmt: str) -> None:
    """Sparse and token vectors go to parquet or jsonl as they are: no matrix (npy), no int8/binary types."""
    if fmt == "npy":
        raise ValueError(f"{job.output}: the model's vectors are sparse or per token, which a .npy matrix cannot "
                         "hold; write .parquet or .jsonl")
    if job.vector_type != "float":
        raise ValueError(f"--vector-type {job.vector_type} applies to dense vectors; this model's are sparse or "
                         "per token (written as float32)")


def row_error(chunk: Chunk, plan: Plan, error: BulkRowError) -> BulkInputError:
    info = plan.files[chunk.spec.file]
    name = info.row_name(chunk.rows[error.index]) if 0 <= error.index < len(chunk.rows) else str(info.path)
    message = error.message.replace('send "truncate": true', "pass --truncate")
    return BulkInputError(f"{name}: text {message}" if message.startswith(("has ", "is ")) else f"{name}: {message}")


async def run_job(job: Job, embedder: Embedder) -> Summary:
    started = time.monotonic()
    with locked_output(job) as (fmt, lock):
        return await _run_locked(job, embedder, fmt, lock, started)


async def _run_locked(job: Job, embedder: Embedder, fmt: str, lock: WorkLock, started: float) -> Summary:
    plan, _ = await asyncio.to_thread(job.plan)
    fingerprint = {**plan.fingerprint(), **await asyncio.to_thread(embedder.fingerprint),
                   **job.output_fingerprint(fmt)}
    if embedder.shaped:
        check_shaped(job, fmt)
    state = JobState(job, fmt, fingerprint, lock)
    if state.complete:
        return state.summary(time.monotonic() - started, 0)
    remaining = plan.chunks[state.parts_done:]
    if state.parts_done:
        log.info("resuming %s: %d of %d chunks already done", job.output, state.parts_done, len(plan.chunks))
    new_rows = 0
    if remaining:
        await embedder.start()
        progress = Progress(plan.total_rows, state.rows_in_done, bar=job.progress, log_every_s=job.log_every_s)
        reader = ChunkReader(plan)

        async def write(chunk: Chunk, task: asyncio.Task[tuple[np.ndarray | pa.Array, int]]) -> None:
            try:
                vectors, tokens = await task
            except BulkRowError as exc:
                raise row_error(chunk, plan, exc) from None
            await asyncio.to_thread(state.add_part, chunk, vectors, tokens)

        try:
            async with InOrder(embedder.pipeline_depth, write) as in_flight:
                for spec in remaining:
                    chunk = await asyncio.to_thread(reader.read, spec)
                    progress.update(chunk.skipped)
                    new_rows += len(chunk.texts)
                    await in_flight.add(chunk, embedder.embed(chunk.texts, progress.update))
                await in_flight.drain()
        finally:
            reader.close()
            progress.close()
            await embedder.close()
    await asyncio.to_thread(state.finish)
    return state.summary(time.monotonic() - started, new_rows)
