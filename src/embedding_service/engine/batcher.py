"""Dynamic batching: sequences from many requests share batches bounded by count and a token budget.

Each request (a job) is answered exactly once: with its vectors in its own order, or with the error of
the first batch that failed it. The queue is bounded; past its bounds `submit` refuses at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from .. import tracing
from ..errors import ErrorKind, ServiceError

__all__ = ["BatchPolicy", "Batcher", "batch_cost"]


def batch_cost(count: int, longest: int, total: int, *, padded: bool) -> int:
    """What a batch costs against the token budget: padded, its size x its longest sequence; packed (vLLM),
    the sum of its sequences. The one rule for the batcher and the bulk runner's own batches."""
    return count * longest if padded else total

log = logging.getLogger("embedding_service")

EmbedFn = Callable[[Sequence[Sequence[int]]], np.ndarray]


@dataclass(eq=False)
class _Job:
    seqs: Sequence[Sequence[int]]
    future: asyncio.Future[np.ndarray]
    tokens: int
    enqueued_at: float
    remaining: int = 0
    queued: int = 0  # of its items, still in the queue
    vectors: np.ndarray | None = None
    started_at: float | None = None
    compute_s: float = 0.0
    trace: object = None  # the request's span context, when tracing is on (its batch links to it)

    @property
    def done(self) -> bool:
        return self.future.done()


@dataclass(eq=False)
class _Item:
    job: _Job
    index: int
    ids: Sequence[int]


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
        self._max_queue_requests = policy.max_queue_requests
        self._max_queue_tokens = policy.max_queue_tokens
        self._on_batch = on_batch
        self._items: deque[_Item] = deque()  # may hold items of cancelled jobs: skipped when reached
        self._live = 0  # items in `_items` whose job still wants them
        self._arrived = asyncio.Event()
        self._jobs: set[_Job] = set()
        self._queued_tokens = 0
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
        return len(self._jobs)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def submit(self, seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, float, float]:
        """Embed `seqs`; returns (vectors, queue seconds, compute seconds). Raises ServiceError."""
        if self._closed_error is not None:
            raise self._closed_error
        tokens = sum(len(s) for s in seqs)
        if self._jobs and (
            len(self._jobs) >= self._max_queue_requests or self._queued_tokens + tokens > self._max_queue_tokens
        ):
            raise ServiceError(
                ErrorKind.OVERLOADED,
                f"server is at capacity ({len(self._jobs)} requests, {self._queued_tokens} tokens queued); "
                "retry shortly",
                code="overloaded",
                retry_after_s=1,
            )
        loop = asyncio.get_running_loop()
        job = _Job(seqs=seqs, future=loop.create_future(), tokens=tokens, enqueued_at=time.perf_counter(),
                   remaining=len(seqs), queued=len(seqs))
        if tracing.TRACER is not None:
            job.trace = tracing.current_span_context()
        self._jobs.add(job)
        self._queued_tokens += tokens
        job.future.add_done_callback(functools.partial(self._forget_job, job))
        self._items.extend(_Item(job, i, ids) for i, ids in enumerate(seqs))
        self._live += len(seqs)
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
        while self._jobs or self._inflight:
            await asyncio.sleep(0.01)

    def wake(self) -> None:
        """An incoming request will not be submitted after all (it was refused): stop waiting for it."""
        self._arrived.set()

    def fail_all(self, error: BaseException) -> None:
        for job in list(self._jobs):
            if not job.future.done():
                job.future.set_exception(error)
        self._items.clear()
        self._live = 0

    # --- internals ---------------------------------------------------------------------------------------
    def _forget_job(self, job: _Job, _future: object) -> None:
        if job in self._jobs:
            self._jobs.discard(job)
            self._queued_tokens -= job.tokens
        if job.queued and (job.future.cancelled() or job.future.exception() is not None):
            # O(1): its queued items stay where they are and are skipped when reached (rebuilding the queue
            # per job made a storm of hang-ups quadratic: 240 cancellations stalled the loop 3 s). The queue
            # is compacted only once dead items outnumber live ones, so their memory stays bounded.
            self._live -= job.queued
            job.queued = 0
            if len(self._items) > 2 * self._live + 1024:
                self._items = deque(item for item in self._items if not item.job.done)

    def _cost(self, count: int, longest: int, total: int) -> int:
        return batch_cost(count, longest, total, padded=self._padded)

    def _take_batch(self) -> list[_Item]:
        if self._padded:
            return self._take_similar_lengths()
        batch: list[_Item] = []
        longest = total = 0
        while self._items and len(batch) < self._max_size:
            item = self._items[0]
            if item.job.done:
                self._items.popleft()
                continue
            n = len(item.ids)
            if batch and self._cost(len(batch) + 1, max(longest, n), total + n) > self._max_tokens:
                break
            self._items.popleft()
            self._took(item)
            batch.append(item)
            longest, total = max(longest, n), total + n
        return batch

    def _take_similar_lengths(self) -> list[_Item]:
        """Padded backends pay (longest x count): batch the oldest item with the queued items nearest its
        length, looking a few batches deep. The oldest always goes first, so nothing starves."""
        window: list[_Item] = []
        while self._items and len(window) < 4 * self._max_size:
            item = self._items.popleft()
            if not item.job.done:
                window.append(item)
        if not window:
            return []
        anchor = len(window[0].ids)
        order = [0, *sorted(range(1, len(window)), key=lambda i: (abs(len(window[i].ids) - anchor), i))]
        chosen: list[int] = []
        longest = 0
        for index in order:
            if len(chosen) == self._max_size:
                break
            n = len(window[index].ids)
            if chosen and max(longest, n) * (len(chosen) + 1) > self._max_tokens:
                continue
            chosen.append(index)
            longest = max(longest, n)
        picked = set(chosen)
        self._items.extendleft(reversed([item for i, item in enumerate(window) if i not in picked]))
        batch = [window[i] for i in sorted(chosen)]
        for item in batch:
            self._took(item)
        return batch

    def _took(self, item: _Item) -> None:
        item.job.queued -= 1
        self._live -= 1

    def _pending_count(self) -> int:
        return self._live

    def _returning(self) -> int:
        """Clients answered by the last batch that may be on their way back (counted once)."""
        answered, self._answered = self._answered, 0
        return answered

    def _note_answered(self, batch: list[_Item]) -> None:
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
                while not self._items:
                    self._arrived.clear()
                    await self._arrived.wait()
                # Wait to fill a batch while other batches run (new work queues up meanwhile and goes out
                # together once a slot frees), while accepted requests are still being tokenised, or while
                # clients the last batch answered have not all come back: they are moments away (sending
                # the first one back alone split every batch at 16 HTTP clients into 1 + 15, then into two
                # alternating halves). An idle backend with nothing on its way starts at once.
                returning, now = self._returning(), time.perf_counter()
                if self._timeout > 0 and self._wait_deadline(now, returning) is not None:
                    await self._wait_to_fill(now, returning)
                batch = self._take_batch()
                if not batch:
                    self._slots.release()
                    continue
                self._running += 1
                # The backend starts now, not when a task gets its turn: the loop may first have to run every
                # request the previous batch answered (their responses), which left the model idle ~10 ms
                # per batch at 64 clients.
                traced = None if tracing.TRACER is None else tracing.start_batch(
                    [item.job.trace for item in batch], len(batch), sum(len(item.ids) for item in batch))
                started, compute = self._start_compute(batch, traced)
                task = asyncio.get_running_loop().create_task(self._finish_batch(batch, started, compute, traced))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug here must not leave requests hanging
            log.exception("batcher crashed")
            self.fail_all(ServiceError(ErrorKind.INTERNAL, f"batcher failed: {type(exc).__name__}"))
            raise

    def _start_compute(self, batch: list[_Item], traced: object = None) -> tuple[float, asyncio.Future[np.ndarray]]:
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

    async def _finish_batch(self, batch: list[_Item], started: float, compute: asyncio.Future[np.ndarray],
                            traced: object = None) -> None:
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
            self._note_answered(batch)
            return
        finally:
            self._running -= 1
            self._slots.release()
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
        self._note_answered(batch)
