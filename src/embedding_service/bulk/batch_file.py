"""`embedding-service embed --batch-file requests.jsonl -o output.jsonl`: an OpenAI batch input file run by the
bulk runner (in this process, on `--url` servers or on `--ray`) instead of a server's Batch API (docs/batch.md,
"Running a batch elsewhere").

The file is validated first as the Batch API validates it (batch/lines.py): with any bad line nothing runs, and
each problem is named by its line. Then the lines run chunk by chunk through a sender (batch_senders.py); each
chunk's output and error lines are appended to `<output>.partial/` and fsynced, then the manifest records the
new line count and lengths (atomically). A rerun after a kill cuts the files back to the recorded lengths and
goes on from the recorded line: no line lost or written twice, and (line ids derived from the file's content
and the line's number) the same bytes as an uninterrupted run. At the end both are renamed into place: the
output file (`-o`) and, when a line failed, the error file beside it, as the Batch API's output and error files.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import orjson

from ..batch.disk import append_at, truncate_at
from ..batch.lines import ENDPOINTS, BatchLine, LineError, line_limit, read_lines, validate_file
from ..batch.objects import Answer, answer_line, request_ids
from ..config import EmbeddingConfig
from .batch_senders import LineSender, choose_sender
from .faults import fault_point
from .inputs import BulkInputError
from .lock import WorkLock
from .manifest import FingerprintMismatch, atomic_write, describe_mismatch, fsync_dir, work_dir
from .ordered import InOrder
from .progress import Progress
from .writers import mark_fingerprint, read_fingerprint

__all__ = ["BatchFileInvalid", "BatchFileJob", "BatchSummary", "run_batch_file", "run_batch_file_command"]

_MANIFEST, _OUT, _ERR = "batch.json", "output.jsonl", "errors.jsonl"
_VERSION = 1


class BatchFileInvalid(ValueError):
    """The input file failed validation: nothing ran. The message names each problem (the first hundred)."""

    def __init__(self, path: Path, errors: list[LineError]) -> None:
        self.errors = errors
        listed = "\n".join(f"  {path}: {e.message} [{e.code}]" for e in errors)
        super().__init__(f"{path} is not a valid batch input file; nothing was run:\n{listed}")


@dataclass
class BatchFileJob:
    source: Path
    output: Path
    error_file: Path | None = None  # default: beside the output, `<stem>.errors.jsonl`
    max_lines: int = 50_000  # the Batch API's limits (its settings)
    max_line_bytes: int = line_limit(2 * 1024 * 1024)
    chunk_lines: int = 256  # lines per durable step
    overwrite: bool = False
    progress: bool | None = None
    log_every_s: float = 30.0

    @property
    def errors_path(self) -> Path:
        return self.error_file or self.output.with_name(self.output.stem + ".errors.jsonl")

    def check(self) -> None:
        if self.output.suffix.lower() != ".jsonl":
            raise ValueError(f"output {self.output}: --batch-file writes an OpenAI batch output file; name it .jsonl")
        if not self.source.is_file():
            raise BulkInputError(f"batch file {self.source} does not exist")
        for folder in {self.output.parent, self.errors_path.parent}:
            if not folder.is_dir():
                raise ValueError(f"output folder {folder} does not exist")
        if len({self.source.resolve(), self.output.resolve(), self.errors_path.resolve()}) < 3:
            raise ValueError("the batch file, the output (-o) and the error file (--error-file) must be three files")


@dataclass
class _State:
    """The manifest: what is done, fsynced and recorded."""

    fingerprint: dict[str, Any]
    next_line: int = 0  # requests done (blank lines not counted)
    out_bytes: int = 0
    err_bytes: int = 0
    completed: int = 0
    failed: int = 0
    version: int = field(default=_VERSION)

    @classmethod
    def load(cls, path: Path) -> _State:
        data = orjson.loads(path.read_bytes())
        if data.get("version") != _VERSION:
            raise FingerprintMismatch(f"{path} is from another version of this tool; pass --overwrite")
        return cls(**data)

    def save(self, path: Path) -> None:
        atomic_write(path, orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2), fault="manifest")


@dataclass
class BatchSummary:
    output: Path
    errors: Path
    total: int  # requests in the file
    counts: tuple[int, int] = (0, 0)  # completed, failed
    new_lines: int = 0  # run by this run (a resumed run did the rest before)
    times: tuple[float, float] = (0.0, 0.0)  # seconds in all, and of those running the lines (models loaded)
    already_done: bool = False

    def line(self) -> str:
        if self.already_done:
            return f"embedding-service embed: {self.output} is already complete; nothing to do"
        (completed, failed), (seconds, running) = self.counts, self.times
        notes = [f"failed lines in {self.errors}"] if failed else []
        if self.new_lines != self.total:
            notes.append(f"{self.total - self.new_lines} lines were done before (resumed)")
        return (f"embedding-service embed: {self.total} requests ({completed} completed, {failed} failed) in "
                f"{seconds:.1f}s (running them: {self.new_lines / max(running, 1e-9):.1f} requests/s) -> "
                f"{self.output}" + "".join(f"; {note}" for note in notes))


def endpoint_of(path: Path) -> str:
    """The endpoint the file's lines name (its first line's `url`; validation holds every line to it)."""
    with path.open("rb") as source:
        for raw in source:
            if raw.strip():
                try:
                    url = orjson.loads(raw).get("url")
                except (orjson.JSONDecodeError, AttributeError):
                    break
                return url if url in ENDPOINTS else ENDPOINTS[0]
    return ENDPOINTS[0]


def _sha256(path: Path) -> str:
    with path.open("rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


async def run_batch_file(job: BatchFileJob, sender: LineSender) -> BatchSummary:
    started = time.monotonic()
    job.check()
    lock = WorkLock.acquire(work_dir(job.output), job.output)  # before reading: a busy output is refused at once
    try:
        return await _run_locked(job, sender, lock, started)
    finally:
        lock.release()


async def _run_locked(job: BatchFileJob, sender: LineSender, lock: WorkLock, started: float) -> BatchSummary:
    endpoint = await asyncio.to_thread(endpoint_of, job.source)
    total, problems = await asyncio.to_thread(validate_file, job.source, endpoint, max_lines=job.max_lines,
                                              max_line_bytes=job.max_line_bytes)
    if problems:
        raise BatchFileInvalid(job.source, problems)
    digest = await asyncio.to_thread(_sha256, job.source)
    fingerprint = {"batch_file": digest, "endpoint": endpoint, **await asyncio.to_thread(sender.fingerprint)}
    state = await asyncio.to_thread(_open_state, job, lock, fingerprint)
    if state is None:
        return BatchSummary(job.output, job.errors_path, total, already_done=True)
    done_before, run_seconds = state.next_line, 0.0
    if state.next_line < total:
        folder = lock.folder
        truncate_at(folder / _OUT, state.out_bytes)  # (lines written but not recorded are written again)
        truncate_at(folder / _ERR, state.err_bytes)
        await sender.start()
        try:
            run_started = time.monotonic()
            await _run_lines(job, sender, endpoint, "batch_" + digest[:32], folder, state, total)
            run_seconds = time.monotonic() - run_started
        finally:
            await sender.close()
    await asyncio.to_thread(_finish, job, lock, state)
    return BatchSummary(job.output, job.errors_path, total, (state.completed, state.failed), total - done_before,
                        (time.monotonic() - started, run_seconds))


def _open_state(job: BatchFileJob, lock: WorkLock, fingerprint: dict[str, Any]) -> _State | None:
    """The run to resume, a new one, or None when the output is complete already."""
    if job.overwrite:
        job.output.unlink(missing_ok=True)
        job.errors_path.unlink(missing_ok=True)
        lock.clear()
    path = lock.folder / _MANIFEST
    if path.is_file():
        state = _State.load(path)
        if state.fingerprint == fingerprint:
            return state
        if state.next_line:
            raise FingerprintMismatch(f"{lock.folder} holds a run with other settings "
                                      f"({describe_mismatch(state.fingerprint, fingerprint)}); rerun the original "
                                      "command to finish it, or pass --overwrite to start again")
        lock.clear()  # nothing was done: start afresh
    elif job.output.exists():
        if read_fingerprint(job.output) == fingerprint:
            return None
        raise FingerprintMismatch(f"{job.output} already exists (from another job or other settings); pass "
                                  "--overwrite to replace it, or choose another -o")
    elif job.errors_path.exists():
        raise FingerprintMismatch(f"{job.errors_path} already exists; pass --overwrite to replace it, or choose "
                                  "another --error-file")
    state = _State(fingerprint)
    state.save(path)
    return state


async def _run_lines(job: BatchFileJob, sender: LineSender, endpoint: str, batch_id: str, folder: Path,
                     state: _State, total: int) -> None:
    lines = read_lines(job.source, endpoint, start=state.next_line, max_line_bytes=job.max_line_bytes)
    progress = Progress(total, state.next_line, bar=job.progress, log_every_s=job.log_every_s)

    async def write(chunk: list[BatchLine], task: asyncio.Task[list[Answer]]) -> None:
        answers = await task
        await asyncio.to_thread(_commit, folder, state, _output_lines(batch_id, chunk, answers), len(chunk))
        progress.update(len(chunk))

    try:
        async with InOrder(sender.depth, write) as in_flight:
            while chunk := await asyncio.to_thread(lambda: list(islice(lines, job.chunk_lines))):
                requests = [(line.body, request_ids(batch_id, line.index)[1]) for line in chunk]
                await in_flight.add(chunk, sender.answer(endpoint, requests))
            await in_flight.drain()
    finally:
        lines.close()
        progress.close()


def _output_lines(batch_id: str, chunk: list[BatchLine], answers: list[Answer]) -> Iterator[tuple[bool, bytes]]:
    for line, answer in zip(chunk, answers, strict=True):
        line_id, request_id = request_ids(batch_id, line.index)
        yield answer_line(line_id, line.custom_id, status=answer.status, request_id=request_id, body=answer.body,
                          content_type=answer.content_type)


def _commit(folder: Path, state: _State, answered: Iterator[tuple[bool, bytes]], count: int) -> None:
    """Append a chunk's lines (fsynced), then record them: a kill in between writes them again, once."""
    out, err = bytearray(), bytearray()
    completed = 0
    for ok, data in answered:
        (out if ok else err).extend(data)
        completed += ok
    state.out_bytes = append_at(folder / _OUT, bytes(out), state.out_bytes)
    fault_point("batch-appended")
    state.err_bytes = append_at(folder / _ERR, bytes(err), state.err_bytes)
    state.next_line += count
    state.completed += completed
    state.failed += count - completed
    state.save(folder / _MANIFEST)


def _finish(job: BatchFileJob, lock: WorkLock, state: _State) -> None:
    """Rename the error file (if a line failed), then the output, into place; the output last: its presence,
    marked with the fingerprint, says the job is done (a kill between the two renames redoes only this)."""
    folder = lock.folder
    if state.err_bytes and (folder / _ERR).exists():
        os.replace(folder / _ERR, job.errors_path)
        fsync_dir(job.errors_path.parent)
    out = folder / _OUT
    out.touch()  # (every line failed: an empty output file)
    mark_fingerprint(out, state.fingerprint)
    os.replace(out, job.output)
    fsync_dir(job.output.parent)
    lock.remove()


def run_batch_file_command(args: argparse.Namespace, settings: EmbeddingConfig, urls: list[str]) -> BatchSummary:
    """`embed --batch-file` from its flags: the Batch API's limits and concurrency from `settings`."""
    ray_options = None
    if args.ray:
        from .ray_runner import RayOptions

        ray_options = RayOptions(args.ray, args.ray_actors, args.ray_cpus_per_actor, args.ray_gpus_per_actor)
    concurrency = args.concurrency or settings.batch_concurrency  # lines in flight per server, actor or here
    workers = len(urls) or (args.ray_actors if args.ray else 1)
    sender = choose_sender(settings, urls=urls, ray_options=ray_options, api_key=args.api_key,
                           concurrency=concurrency, retries=args.retries, timeout_s=args.timeout)
    job = BatchFileJob(args.batch_file, args.output, args.error_file, max_lines=settings.batch_max_lines,
                       max_line_bytes=line_limit(settings.max_body_bytes),
                       chunk_lines=max(64, 4 * concurrency * (1 if args.ray else workers)), overwrite=args.overwrite,
                       progress=args.progress, log_every_s=args.log_every)
    return asyncio.run(run_batch_file(job, sender))
