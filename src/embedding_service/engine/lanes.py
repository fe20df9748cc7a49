"""The batcher's queues: a lane holds its jobs' items in arrival order, its own bounds, and the rule for
taking a batch from it. The batcher has two: online requests, and background work (Batch API lines) that
runs only when the online lane leaves the engine idle.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Item", "Job", "Lane", "batch_cost"]


def batch_cost(count: int, longest: int, total: int, *, padded: bool) -> int:
    """What a batch costs against the token budget: padded, its size x its longest sequence; packed (vLLM),
    the sum of its sequences. The one rule for the batcher and the bulk runner's own batches."""
    return count * longest if padded else total


@dataclass(eq=False)
class Job:
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
class Item:
    job: Job
    index: int
    ids: Sequence[int]


class Lane:
    """One queue, bounded by requests and tokens; past its bounds `full` says so and the batcher refuses."""

    def __init__(self, max_requests: int, max_tokens: int) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.items: deque[Item] = deque()  # may hold items of cancelled jobs: skipped when reached
        self.live = 0  # items in `items` whose job still wants them
        self.jobs: set[Job] = set()
        self.tokens = 0

    def full(self, tokens: int) -> bool:
        """A job of `tokens` would pass the bounds (one job alone is always let in, however large)."""
        return bool(self.jobs) and (len(self.jobs) >= self.max_requests or self.tokens + tokens > self.max_tokens)

    def add(self, job: Job) -> None:
        self.jobs.add(job)
        self.tokens += job.tokens
        self.items.extend(Item(job, i, ids) for i, ids in enumerate(job.seqs))
        self.live += len(job.seqs)

    def forget(self, job: Job) -> None:
        """`job` is answered (or failed, or cancelled): it no longer counts against the bounds."""
        if job not in self.jobs:
            return
        self.jobs.discard(job)
        self.tokens -= job.tokens
        if job.queued and (job.future.cancelled() or job.future.exception() is not None):
            # O(1): its queued items stay where they are and are skipped when reached (rebuilding the queue
            # per job made a storm of hang-ups quadratic: 240 cancellations stalled the loop 3 s). The queue
            # is compacted only once dead items outnumber live ones, so their memory stays bounded.
            self.live -= job.queued
            job.queued = 0
            if len(self.items) > 2 * self.live + 1024:
                self.items = deque(item for item in self.items if not item.job.done)

    def fail_all(self, error: BaseException) -> None:
        for job in list(self.jobs):
            if not job.future.done():
                job.future.set_exception(error)
        self.items.clear()  # (`live` drops to 0 as each failed job's `forget` runs)

    def take(self, max_size: int, max_tokens: int, *, padded: bool) -> list[Item]:
        """The next batch: at most `max_size` items and `max_tokens` by `batch_cost` (the first item always
        goes, however long)."""
        if padded:
            return self._take_similar_lengths(max_size, max_tokens)
        batch: list[Item] = []
        longest = total = 0
        while self.items and len(batch) < max_size:
            item = self.items[0]
            if item.job.done:
                self.items.popleft()
                continue
            n = len(item.ids)
            if batch and batch_cost(len(batch) + 1, max(longest, n), total + n, padded=False) > max_tokens:
                break
            self.items.popleft()
            self._took(item)
            batch.append(item)
            longest, total = max(longest, n), total + n
        return batch

    def _take_similar_lengths(self, max_size: int, max_tokens: int) -> list[Item]:
        """Padded backends pay (longest x count): batch the oldest item with the queued items nearest its
        length, looking a few batches deep. The oldest always goes first, so nothing starves."""
        window: list[Item] = []
        while self.items and len(window) < 4 * max_size:
            item = self.items.popleft()
            if not item.job.done:
                window.append(item)
        if not window:
            return []
        anchor = len(window[0].ids)
        order = [0, *sorted(range(1, len(window)), key=lambda i: (abs(len(window[i].ids) - anchor), i))]
        chosen: list[int] = []
        longest = 0
        for index in order:
            if len(chosen) == max_size:
                break
            n = len(window[index].ids)
            if chosen and max(longest, n) * (len(chosen) + 1) > max_tokens:
                continue
            chosen.append(index)
            longest = max(longest, n)
        picked = set(chosen)
        self.items.extendleft(reversed([item for i, item in enumerate(window) if i not in picked]))
        batch = [window[i] for i in sorted(chosen)]
        for item in batch:
            self._took(item)
        return batch

    def _took(self, item: Item) -> None:
        item.job.queued -= 1
        self.live -= 1
