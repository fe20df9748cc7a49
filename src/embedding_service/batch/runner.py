"""The batch runner: one background task that takes unfinished batches oldest first and runs their lines.

Durability: lines run in small chunks; a chunk's output and error lines are appended and fsynced, then the
batch's row records the new line count and file lengths in one commit. After a kill -9 the runner starts
the batch again at the recorded line, cutting the files back to the recorded lengths first: no line lost
and none written twice, and (line ids derived from the batch id and line number) the same bytes as a run
that never stopped. Online traffic first: lines run at background priority (invoke.py), so the engines'
batchers serve them only in the time online requests leave idle; at most `concurrency` lines are in flight,
and a cancel or the window's end drops those still waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeVar

import orjson

from .disk import Disk
from .invoke import RETRY_STATUSES, Invoker
from .lines import BatchLine, read_lines, validate_file
from .metrics import BatchStats
from .objects import answer_line, output_line, request_ids
from .store import BatchRow, FileRow, Store

__all__ = ["BatchRunner", "RunnerOptions"]

log = logging.getLogger("embedding_service")
T = TypeVar("T")

_CHUNK_LINES = 16  # lines per durable step: a cancel or a crash loses at most this much work in flight
_HOUSEKEEPING_S = 3600.0
_STOP_POLL_S = 0.1  # how often lines waiting for the engine look for a cancel or the window's end
_PROGRESS_S = 30.0  # a running batch logs its progress this often


@dataclass(frozen=True)
class RunnerOptions:
    max_lines: int
    max_line_bytes: int
    max_stored_bytes: int
    retention_s: float
    concurrency: int


class _Stop(Exception):
    """The batch stops between chunks: cancelled, expired, or failed (with the reason)."""


class BatchRunner:
    def __init__(self, store: Store, disk: Disk, invoker: Invoker, options: RunnerOptions) -> None:
        self.store, self.disk, self.invoker, self.options = store, disk, invoker, options
        self._wake = asyncio.Event()
        self._cancels: set[str] = set()
        self.stats = BatchStats()
        self._progress_at = 0.0  # when the running batch last logged its progress (monotonic)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batch-runner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, batch_id: str) -> None:
        self._cancels.add(batch_id)
        self._wake.set()

    # --- the loop -------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        await self.housekeep()
        last_housekeeping = time.monotonic()
        while True:
            self._wake.clear()
            active = await self.store.call(self.store.active_batches)
            self._count_statuses(active)
            if active:
                batch = active[0]
                try:
                    await self._run(batch)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug must not wedge the queue: this batch fails, the next runs
                    log.error("batch %s failed: %s: %s", batch.id, type(exc).__name__, exc, exc_info=exc)
                    await self._fail(batch, "internal_error", "the server failed running this batch; see its log")
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), _HOUSEKEEPING_S)
            if time.monotonic() - last_housekeeping > _HOUSEKEEPING_S:
                await self.housekeep()
                last_housekeeping = time.monotonic()

    def _count_statuses(self, active: list[BatchRow]) -> None:
        self.stats.active = len(active)
        self.stats.statuses = Counter(row.status for row in active)

    async def _run(self, batch: BatchRow) -> None:
        if batch.status == "validating":
            batch = await self._validate(batch)
        if batch.status == "in_progress":
            batch = await self._run_lines(batch)
        if batch.status in ("finalizing", "cancelling"):
            await self._finish(batch)

    async def _validate(self, batch: BatchRow) -> BatchRow:
        opts = self.options
        try:
            total, errors = await asyncio.to_thread(validate_file, self.disk.path(batch.input_file_id), batch.endpoint,
                                                    max_lines=opts.max_lines, max_line_bytes=opts.max_line_bytes)
        except OSError as exc:
            await self._fail(batch, "input_file_unreadable", f"the input file could not be read: {exc.strerror}")
            return await self._reload(batch)
        if errors:
            log.info("batch %s failed validation: %d problem(s), first: %s", batch.id, len(errors), errors[0].message)
            payload = orjson.dumps({"object": "list", "data": [e.as_dict() for e in errors]}).decode()
            await self.store.call(lambda: self.store.update_batch(
                batch.id, only_if=("validating", "cancelling"), status="failed", failed_at=_now(), errors=payload))
        else:
            await self.store.call(lambda: self.store.update_batch(
                batch.id, only_if=("validating",), status="in_progress", in_progress_at=_now(), total=total))
            log.info("batch %s: %d requests to %s", batch.id, total, batch.endpoint)
        return await self._reload(batch)

    async def _run_lines(self, batch: BatchRow) -> BatchRow:
        path = self.disk.path(batch.input_file_id)
        await asyncio.to_thread(self.disk.truncate, batch.out_name, batch.out_bytes)
        await asyncio.to_thread(self.disk.truncate, batch.err_name, batch.err_bytes)
        lines = read_lines(path, batch.endpoint, start=batch.next_line, max_line_bytes=self.options.max_line_bytes)
        self._progress_at = time.monotonic()
        gate = asyncio.Semaphore(self.options.concurrency)  # lines in flight, across chunks
        stop = asyncio.Event()
        watch = asyncio.create_task(self._watch_stop(batch, stop))
        running: _Running | None = None
        try:
            size = max(_CHUNK_LINES, 4 * self.options.concurrency)
            while True:
                chunk = await asyncio.to_thread(lambda: list(islice(lines, size)))
                if chunk:  # the next chunk's lines start before the one before is written: no drained pipeline
                    if self._stopping(batch) and running is not None:  # keep what the chunk in flight answered
                        answers = await _drop(running, stop)
                        batch, _whole = await self._commit(batch, running[0], answers)
                        running = None
                    self._check_stop(batch)
                    after = running
                    running = (chunk, asyncio.gather(*(self._one(batch, line, gate, stop) for line in chunk)))
                else:
                    after, running = running, None
                if after is not None:
                    batch, whole = await self._commit(batch, after[0], await after[1])
                    if not whole:  # stopped inside that chunk: the chunk after it is dropped, unwritten
                        await _drop(running, stop)
                        running = None
                        self._check_stop(batch)
                        break
                if running is None:
                    break
        except _Stop as stopped:  # (a chunk in flight after an unwritten one is dropped: lines stay in order)
            await _drop(running, stop)
            return await self._stopped(batch, str(stopped))
        except OSError as exc:  # a full disk, a lost folder: the batch fails, the store stays whole
            await _drop(running, stop)
            await self._fail(batch, "storage_error", f"writing the batch's output failed: {exc.strerror or exc}")
            return await self._reload(batch)
        finally:
            watch.cancel()
            await _drop(running, stop)  # (a bug's exception: nothing left running)
            lines.close()
        await self.store.call(lambda: self.store.update_batch(
            batch.id, only_if=("in_progress",), status="finalizing", finalizing_at=_now()))
        return await self._reload(batch)

    def _check_stop(self, batch: BatchRow) -> None:
        if batch.id in self._cancels:
            raise _Stop("cancelled")
        if batch.expires_at is not None and _now() >= batch.expires_at:
            raise _Stop("expired")

    async def _commit(self, batch: BatchRow, chunk: list[BatchLine], answers: list[tuple[bool, bytes] | None]
                      ) -> tuple[BatchRow, bool]:
        """Append a chunk's answered lines (those before the first it lacks), in order, and record them in one
        commit. Also whether the whole chunk was answered (if not, the batch is stopping)."""
        done = 0
        out, err = bytearray(), bytearray()
        completed = failed = 0
        for answer in answers:
            if answer is None:  # stopped while it waited: keep the lines before it, in order
                break
            ok, data = answer
            (out if ok else err).extend(data)
            completed, failed, done = completed + ok, failed + (not ok), done + 1
        if done:
            stored = await self.store.call(self.store.stored_bytes)
            if stored + len(out) + len(err) > self.options.max_stored_bytes:
                raise _Stop("storage_full")
            out_bytes = await asyncio.to_thread(self.disk.append, batch.out_name, bytes(out), batch.out_bytes)
            err_bytes = await asyncio.to_thread(self.disk.append, batch.err_name, bytes(err), batch.err_bytes)
            await self.store.call(lambda: self.store.update_batch(
                batch.id, next_line=batch.next_line + done, out_bytes=out_bytes, err_bytes=err_bytes,
                completed=batch.completed + completed, failed=batch.failed + failed))
            self.stats.lines.update(completed=completed, failed=failed)
            batch = await self._reload(batch)
            await self._progress(batch)
        return batch, done == len(chunk)

    async def _watch_stop(self, batch: BatchRow, stop: asyncio.Event) -> None:
        """Set `stop` once the batch is cancelled or past its window: lines still waiting for an engine busy
        with online traffic give up then (a cancel stops within a fraction of a second)."""
        while not self._stopping(batch):
            await asyncio.sleep(_STOP_POLL_S)
        stop.set()

    def _stopping(self, batch: BatchRow) -> bool:
        return batch.id in self._cancels or (batch.expires_at is not None and _now() >= batch.expires_at)

    async def _one(self, batch: BatchRow, line: BatchLine, gate: asyncio.Semaphore, stop: asyncio.Event
                   ) -> tuple[bool, bytes] | None:
        """The line's output or error line; None if the batch stopped before it was answered."""
        line_id, request_id = request_ids(batch.id, line.index)
        delay = 0.2
        async with gate:
            while True:
                if stop.is_set():
                    return None
                self.stats.in_flight += 1
                try:
                    answer = await _unless(stop, self.invoker.post(batch.endpoint, line.body, owner=batch.owner,
                                                                   request_id=request_id))
                finally:
                    self.stats.in_flight -= 1
                if answer is None:
                    return None
                if answer.status not in RETRY_STATUSES:
                    break
                await _unless(stop, asyncio.sleep(delay))  # the engine is busy or loading: the line waits
                delay = min(delay * 2, 5.0)
        return answer_line(line_id, line.custom_id, status=answer.status, request_id=request_id, body=answer.body,
                           content_type=answer.content_type)

    async def _progress(self, batch: BatchRow) -> None:
        """Log a running batch's progress every `_PROGRESS_S` (its request_counts are in its object always)."""
        now = time.monotonic()
        if now - self._progress_at < _PROGRESS_S:
            return
        self._progress_at = now
        self._count_statuses(await self.store.call(self.store.active_batches))
        log.info("batch %s: %d of %d requests done (%d completed, %d failed)", batch.id, batch.next_line,
                 batch.total, batch.completed, batch.failed)

    # --- endings --------------------------------------------------------------------------------------
    async def _stopped(self, batch: BatchRow, why: str) -> BatchRow:
        if why == "cancelled":
            await self.store.call(lambda: self.store.update_batch(
                batch.id, only_if=("in_progress", "cancelling"), status="cancelling",
                cancelling_at=batch.cancelling_at or _now()))
        elif why == "expired":
            await self._expire(batch)
        else:
            await self._fail(batch, "storage_full", "the server's storage limit for files was reached; delete "
                             "files (DELETE /v1/files/{id}) and submit the rest again")
        return await self._reload(batch)

    async def _expire(self, batch: BatchRow) -> None:
        """Past the completion window: the lines not run go to the error file as `batch_expired` (OpenAI's)."""
        error = {"code": "batch_expired",
                 "message": "This request could not be executed before the completion window expired."}

        def write_rest() -> tuple[int, int]:
            rest, count = bytearray(), 0
            for line in read_lines(self.disk.path(batch.input_file_id), batch.endpoint, start=batch.next_line,
                                   max_line_bytes=self.options.max_line_bytes):
                rest += output_line(request_ids(batch.id, line.index)[0], line.custom_id, error=error)
                count += 1
            return self.disk.append(batch.err_name, bytes(rest), batch.err_bytes), count

        err_bytes, count = await asyncio.to_thread(write_rest)
        self.stats.lines["failed"] += count
        await self.store.call(lambda: self.store.update_batch(
            batch.id, next_line=batch.next_line + count, err_bytes=err_bytes, failed=batch.failed + count))
        await self._finish(await self._reload(batch), final="expired")

    async def _fail(self, batch: BatchRow, code: str, message: str) -> None:
        errors = orjson.dumps({"object": "list", "data": [{"code": code, "message": message, "param": None,
                                                           "line": None}]}).decode()
        log.warning("batch %s failed: %s", batch.id, message)
        await self._finish(batch, final="failed", errors=errors)

    async def _finish(self, batch: BatchRow, *, final: str | None = None, errors: str | None = None) -> None:
        """Publish what the batch wrote as its output and error files, and set its final status."""
        final = final or ("cancelled" if batch.status == "cancelling" else "completed")
        now = _now()
        expires = now + int(self.options.retention_s)
        files: list[FileRow] = []
        changes: dict[str, object] = {"status": final, f"{final}_at": now}
        for name, size, column, suffix in ((batch.out_name, batch.out_bytes, "output_file_id", "output"),
                                           (batch.err_name, batch.err_bytes, "error_file_id", "error")):
            if not size:  # (a file cut back to 0 after a crash: nothing to publish)
                await asyncio.to_thread(self.disk.remove, name)
            else:
                files.append(FileRow(0, name, batch.owner, "batch_output", f"{batch.id}_{suffix}.jsonl", size, now,
                                     expires))
                changes[column] = name
        if errors is not None:
            changes["errors"] = errors
        await self.store.call(lambda: self.store.finish_batch(batch.id, files, **changes))
        self._cancels.discard(batch.id)
        self.stats.batches[final] += 1
        log.info("batch %s %s: %d completed, %d failed of %d", batch.id, final, batch.completed, batch.failed,
                 batch.total)

    async def _reload(self, batch: BatchRow) -> BatchRow:
        fresh = await self.store.call(self.store.batch, batch.owner, batch.id)
        assert fresh is not None
        return fresh

    async def housekeep(self) -> None:
        """Retention: delete files past their time, and finished batches older than that."""
        now = _now()
        for row in await self.store.call(self.store.expired_files, now):
            if await self.store.call(self.store.file_in_use, row.owner, row.id) is None:
                await self.store.call(self.store.delete_file, row.owner, row.id)
                await asyncio.to_thread(self.disk.remove, row.id)
        await self.store.call(self.store.forget_batches, now - int(self.options.retention_s))


def _now() -> int:
    return int(time.time())


_Running = tuple[list[BatchLine], "asyncio.Future[list[tuple[bool, bytes] | None]]"]  # a chunk and its answers


async def _drop(running: _Running | None, stop: asyncio.Event) -> list[tuple[bool, bytes] | None]:
    """Stop the chunk in flight (its lines not yet answered give up) and return what it answered."""
    if running is None:
        return []
    stop.set()
    answers = await asyncio.gather(running[1], return_exceptions=True)
    return answers[0] if isinstance(answers[0], list) else []


async def _unless(stop: asyncio.Event, work: Coroutine[Any, Any, T]) -> T | None:
    """`await work`, unless `stop` is set first: then the work is cancelled and the answer is None."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()
