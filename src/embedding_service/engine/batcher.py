"""Dynamic batching: sequences from many requests share batches bounded by count and a token budget.

Each request (a job) is answered exactly once: with its vectors in its own order, or with the error of
the first batch that failed it. The queue is bounded; past its bounds `submit` refuses at once.

Two lanes (lanes.py): online requests, and background work (Batch API lines) with bounds of its own, so
that it never makes an online request be refused. Online work always goes first; a background batch goes
only when no online request is queued, being tokenised or expected back (a client the last batch answered)
and the engine has been idle as long as a background batch takes; one at a time, and small
(1/`background_divisor` of a batch) unless no online request came for `background_idle_s`: an online
request arriving meanwhile waits at most that one small forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from .. import tracing
from ..errors import ErrorKind, ServiceError
from .lanes import Item, Job, Lane, batch_cost

__all__ = ["BatchPolicy", "Batcher", "batch_cost"]  # (batch_cost: lanes.py's, for the bulk runner)


log = logging.getLogger("embedding_service")

EmbedFn = Callable[[Sequence[Sequence[int]]], np.ndarray]


@dataclass(frozen=True)
class BatchPolicy:
    """How batches are formed and how much may queue: the engine's options plus the backend's cost model."""

    max_batch_size: int  # texts per batch
    max_batch_tokens: int  # budget per batch: padded length x texts (padded), else the sum of lengths
    batch_timeout_s: float  # longest wait to fill a batch while other batches run
    padded: bool
    max_concurrent_batches: int
    max_queue_requests: int
    max_queue_tokens: int
    background_divisor: int = 4  # while online traffic is about, a background batch is this much smaller
    background_idle_s: float = 1.0  # no online request for this long: background batches take full size
    background_guard_s: float = 0.05  # (or batch_timeout_s if longer) how long answered clients may take back


class Batcher:
    def __init__(
        self,
        embed: EmbedFn,
        executor: Executor,
        policy: BatchPolicy,
        *,
        on_batch: Callable[[int, int, float], None] | None = None,
        incoming: Callable[[], int] | None = None,
    ) -> None:
        """`incoming()`: requests already accepted and about to be submitted (being tokenised)."""
        self._embed = embed
        self._incoming = incoming or (lambda: 0)
        self._executor = executor
        self._max_size = policy.max_batch_size
        self._max_tokens = policy.max_batch_tokens
        self._timeout = policy.batch_timeout_s
        self._padded = policy.padded
        self._slots = asyncio.Semaphore(policy.max_concurrent_batches)
        self._on_batch = on_batch
        self._online = Lane(policy.max_queue_requests, policy.max_queue_tokens)
        self._background = Lane(policy.max_queue_requests, policy.max_queue_tokens)  # (bounds of its own)
        self._background_divisor = max(1, policy.background_divisor)
        self._background_idle_s = policy.background_idle_s
        self._background_guard_s = max(policy.background_guard_s, policy.batch_timeout_s)
        self._background_running = 0
        # Seconds a background batch takes (moving average), small ones (True) and full ones: one starts only
        # once the engine has been idle that long, so it fills gaps at least its own length.
        self._background_cost = {True: 0.0, False: 0.0}
        self._background_small = True  # the class of the background batch running (one at a time)
        self._online_at = -float("inf")  # when the last online request was submitted (perf_counter)
        # Seconds from dispatch to answer of the batches of each lane: the batch share of the engine.
        self.busy_seconds = {"online": 0.0, "batch": 0.0}
        self._arrived = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._running = 0  # batches between dispatch and the release of their slot
        self._closed_error: ServiceError | None = None
        # Clients answered by the last batch, when, and how many requests arrived since: over HTTP the
        # answered clients come back a few ms apart, each after the server's own per-request work.
        self._answered = 0
        self._answered_at = 0.0
        self._arrivals = 0

    # --- public ----------------------------------------------------------------------------------------
    @property
    def queued_requests(self) -> int:
        """Online requests queued or running (background work is not counted: it never refuses them)."""
        return len(self._online.jobs)

    @property
    def queued_tokens(self) -> int:
        return self._online.tokens

    @property
    def background_requests(self) -> int:
        return len(self._background.jobs)

    @property
    def background_tokens(self) -> int:
        return self._background.tokens

    def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def submit(self, seqs: Sequence[Sequence[int]], *, background: bool = False
                     ) -> tuple[np.ndarray, float, float]:
        """Embed `seqs`; returns (vectors, queue seconds, compute seconds). Raises ServiceError.
        `background`: low priority (a Batch API line), in its own bounded lane."""
        if self._closed_error is not None:
            raise self._closed_error
        tokens = sum(len(s) for s in seqs)
        lane = self._background if background else self._online
        if lane.full(tokens):
            raise ServiceError(
                ErrorKind.OVERLOADED,
                f"server is at capacity ({len(lane.jobs)} requests, {lane.tokens} tokens queued); retry shortly",
                code="overloaded",
                retry_after_s=1,
            )
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        job = Job(seqs=seqs, future=loop.create_future(), tokens=tokens, enqueued_at=now,
                  remaining=len(seqs), queued=len(seqs))
        if tracing.TRACER is not None:
            job.trace = tracing.current_span_context()
        lane.add(job)
        job.future.add_done_callback(functools.partial(self._forget_job, lane, job))
        if not background:
            self._online_at = now
            self._arrivals += 1
        self._arrived.set()
        vectors = await job.future  # cancellation (client gone, timeout) cancels the future: items are skipped
        started = job.started_at if job.started_at is not None else job.enqueued_at
        return vectors, started - job.enqueued_at, job.compute_s

    async def close(self, error: ServiceError) -> None:
        """Refuse new work, fail everything still queued with `error`, and stop the runner."""
        self._closed_error = error
        self.fail_all(error)
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
            self._runner = None

    async def wait_idle(self) -> None:
        """Return when no job is queued or running (used by graceful drain)."""
        while self._online.jobs or self._background.jobs or self._inflight:
            await asyncio.sleep(0.01)

    def wake(self) -> None:
        """An incoming request will not be submitted after all (it was refused): stop waiting for it."""
        self._arrived.set()

    def fail_all(self, error: BaseException) -> None:
        self._online.fail_all(error)
        self._background.fail_all(error)

    # --- internals ---------------------------------------------------------------------------------------
    def _forget_job(self, lane: Lane, job: Job, _future: object) -> None:
        lane.forget(job)

    def _pending_count(self) -> int:
        return self._online.live

    def _returning(self) -> int:
        """Clients answered by the last batch that may be on their way back (counted once)."""
        answered, self._answered = self._answered, 0
        return answered

    def _note_answered(self, batch: list[Item]) -> None:
        self._answered = len({id(item.job) for item in batch if item.job.done and not item.job.future.cancelled()})
        self._answered_at = time.perf_counter()
        self._arrivals = 0

    def _wait_deadline(self, started: float, returning: int) -> float | None:
        """Until when to wait for company (None: no reason to). While the backend is busy or an accepted
        request is being tokenised: batch_timeout from the start of the wait. For clients that the last
        batch answered and that have not all come back: batch_timeout from that answer, no longer, so that
        open-loop traffic (clients that never come back) costs a request at most that much."""
        if self._running > 0 or self._incoming() > 0:
            return started + self._timeout
        if self._arrivals < returning:
            return min(started, self._answered_at) + self._timeout
        return None

    async def _wait_to_fill(self, started: float, returning: int) -> None:
        """Wait for the batch to fill, until `_wait_deadline`; return early once it is full."""
        while self._pending_count() < self._max_size:
            deadline = self._wait_deadline(started, returning)
            remaining = 0.0 if deadline is None else deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    async def _run(self) -> None:
        try:
            while True:
                await self._slots.acquire()
                batch, background = await self._next_batch()
                if not batch:
                    self._slots.release()
                    continue
                self._running += 1
                self._background_running += background
                # The backend starts now, not when a task gets its turn: the loop may first have to run every
                # request the previous batch answered (their responses), which left the model idle ~10 ms
                # per batch at 64 clients.
                traced = None if tracing.TRACER is None else tracing.start_batch(
                    [item.job.trace for item in batch], len(batch), sum(len(item.ids) for item in batch))
                started, compute = self._start_compute(batch, traced)
                task = asyncio.get_running_loop().create_task(
                    self._finish_batch(batch, started, compute, traced, background=background))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug here must not leave requests hanging
            log.exception("batcher crashed")
            self.fail_all(ServiceError(ErrorKind.INTERNAL, f"batcher failed: {type(exc).__name__}"))
            raise

    async def _next_batch(self) -> tuple[list[Item], bool]:
        """The next batch to run (empty: nothing after all) and whether it is background work."""
        while True:
            if self._online.items:
                # Wait to fill a batch while other batches run (new work queues up meanwhile and goes out
                # together once a slot frees), while accepted requests are still being tokenised, or while
                # clients the last batch answered have not all come back: they are moments away (sending
                # the first one back alone split every batch at 16 HTTP clients into 1 + 15, then into two
                # alternating halves). An idle backend with nothing on its way starts at once.
                returning, now = self._returning(), time.perf_counter()
                if self._timeout > 0 and self._wait_deadline(now, returning) is not None:
                    await self._wait_to_fill(now, returning)
                return self._online.take(self._max_size, self._max_tokens, padded=self._padded), False
            wait = self._background_wait()
            if wait == 0.0:
                size, tokens = self._max_size, self._max_tokens
                self._background_small = self._online_recently()
                if self._background_small:
                    size = max(1, size // self._background_divisor)
                    tokens = max(1, tokens // self._background_divisor)
                return self._background.take(size, tokens, padded=self._padded), True
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), wait)

    def _online_recently(self) -> bool:
        return time.perf_counter() - self._online_at < self._background_idle_s

    def _background_wait(self) -> float | None:
        """0.0: a background batch may start now; else how long until it may (None: until work arrives or a
        batch ends). Never while an online request is being tokenised or a background batch runs; and only
        once the engine has been idle since the last online request or answer for as long as a background
        batch takes (a gap shorter than that is likely one between a client's requests), and, while the
        clients the last batch answered have not all come back, for `background_guard_s` too (a
        closed-loop client is a few ms away, and a batch started in that gap would hold it up)."""
        if self._background.live <= 0 or not self._background.items or self._background_running or self._incoming():
            return None
        need = self._background_cost[self._online_recently()]
        if self._arrivals < self._answered:
            need = max(need, self._background_guard_s)
        left = max(self._online_at, self._answered_at) + need - time.perf_counter()
        return left if left > 0 else 0.0

    def _start_compute(self, batch: list[Item], traced: object = None) -> tuple[float, asyncio.Future[np.ndarray]]:
        started = time.perf_counter()
        for item in batch:
            if item.job.started_at is None:
                item.job.started_at = started
        loop = asyncio.get_running_loop()
        try:
            embed = self._embed if traced is None else tracing.forward_in(traced, self._embed)
            return started, loop.run_in_executor(self._executor, embed, [item.ids for item in batch])
        except RuntimeError as exc:  # the executor is shut down: this batch's requests get the error
            failed: asyncio.Future[np.ndarray] = loop.create_future()
            failed.set_exception(exc)
            return started, failed

    async def _finish_batch(self, batch: list[Item], started: float, compute: asyncio.Future[np.ndarray],
                            traced: object = None, *, background: bool = False) -> None:
        try:
            vectors = await compute
        except BaseException as exc:
            if traced is not None:
                tracing.end_batch(traced, exc)
            if not isinstance(exc, asyncio.CancelledError):
                log.error("a batch of %d sequences failed; its requests get an error", len(batch),
                          exc_info=exc)
            for item in batch:
                if not item.job.future.done():
                    item.job.future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            if not background:
                self._note_answered(batch)
            return
        finally:
            self._running -= 1
            self._slots.release()
            self.busy_seconds["batch" if background else "online"] += time.perf_counter() - started
            if background:
                self._background_running -= 1
                took, old = time.perf_counter() - started, self._background_cost[self._background_small]
                self._background_cost[self._background_small] = took if old == 0.0 else 0.7 * old + 0.3 * took
                self._arrived.set()  # the next background batch may go
        if traced is not None:
            tracing.end_batch(traced, None)
        elapsed = time.perf_counter() - started
        tokens = sum(len(item.ids) for item in batch)
        if self._on_batch is not None:
            self._on_batch(len(batch), tokens, elapsed)
        counted: set[int] = set()
        for row, item in enumerate(batch):
            job = item.job
            if job.future.done():
                continue
            if id(job) not in counted:
                counted.add(id(job))
                job.compute_s += elapsed
            if job.vectors is None:
                job.vectors = np.empty((len(job.seqs), vectors.shape[1]), dtype=vectors.dtype)  # (object: sparse)
            job.vectors[item.index] = vectors[row]
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(job.vectors)
        if not background:  # (its clients are the batch runner's lines, not clients on their way back)
            self._note_answered(batch)
