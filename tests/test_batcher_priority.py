"""The batcher's background lane (Batch API lines): online requests go first, background work fills the idle
engine in small batches, one at a time, with bounds of its own, and finishes once online traffic stops."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.engine.batcher import Batcher, BatchPolicy
from embedding_service.errors import ErrorKind, ServiceError

pytestmark = pytest.mark.asyncio

ONLINE, BACKGROUND = 1000, 5000  # first token ids: which lane a sequence came from


class Recorder:
    """The fake backend, recording the first token id of every sequence of every batch."""

    def __init__(self, delay_s: float) -> None:
        self.backend = FakeBackend(delay_s=delay_s)
        self.batches: list[list[int]] = []

    def __call__(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        self.batches.append([ids[0] for ids in seqs])
        return self.backend.embed(seqs)

    def lanes(self) -> list[str]:
        return ["online" if batch[0] < BACKGROUND else "batch" for batch in self.batches]


def make(embed: Recorder, **kwargs: object) -> Batcher:
    options: dict = {"max_batch_size": 8, "max_batch_tokens": 10_000, "batch_timeout_s": 0.0, "padded": False,
                     "max_concurrent_batches": 1, "max_queue_requests": 1024, "max_queue_tokens": 1_000_000,
                     "background_idle_s": 600.0, "background_guard_s": 0.0}
    options.update(kwargs)
    batcher = Batcher(embed, ThreadPoolExecutor(1), BatchPolicy(**options))
    batcher.start()
    return batcher


def seqs(start: int, count: int) -> list[list[int]]:
    return [[start + i, 7, 7] for i in range(count)]


async def _until(condition: object) -> None:
    while not condition():  # type: ignore[operator]
        await asyncio.sleep(0.002)


async def test_an_online_request_goes_in_the_next_batch_before_queued_background_work() -> None:
    embed = Recorder(delay_s=0.05)
    batcher = make(embed)
    await batcher.submit(seqs(ONLINE - 100, 1))  # online traffic just now: background batches are small
    background = asyncio.ensure_future(batcher.submit(seqs(BACKGROUND, 20), background=True))
    await _until(lambda: embed.batches)  # a background batch is running
    started = len(embed.batches)  # the last of them is running now
    online = await batcher.submit(seqs(ONLINE, 3))
    assert embed.batches[started] == [ONLINE, ONLINE + 1, ONLINE + 2]  # the very next batch
    assert embed.lanes()[1:started] == ["batch"] * (started - 1)
    np.testing.assert_array_equal(online[0], embed.backend.embed(seqs(ONLINE, 3)))
    vectors, _, _ = await background
    np.testing.assert_array_equal(vectors, embed.backend.embed(seqs(BACKGROUND, 20)))
    # While online traffic is about, a background batch is a quarter of a batch; one runs at a time.
    assert all(len(batch) <= 2 for batch, lane in zip(embed.batches, embed.lanes(), strict=True) if lane == "batch")
    assert batcher.busy_seconds["online"] > 0 and batcher.busy_seconds["batch"] > 0


async def test_an_idle_engine_runs_background_work_in_full_batches() -> None:
    embed = Recorder(delay_s=0.0)
    batcher = make(embed, background_idle_s=0.0)
    vectors, _, _ = await batcher.submit(seqs(BACKGROUND, 20), background=True)
    assert [len(batch) for batch in embed.batches] == [8, 8, 4]
    np.testing.assert_array_equal(vectors, embed.backend.embed(seqs(BACKGROUND, 20)))


async def test_background_work_waits_out_online_traffic_then_finishes() -> None:
    embed = Recorder(delay_s=0.01)
    batcher = make(embed, background_guard_s=0.05)
    stop = asyncio.Event()

    async def client(n: int) -> None:  # closed loop: back at once after each answer
        i = 0
        while not stop.is_set():
            await batcher.submit(seqs(ONLINE + 100 * n + i % 100, 1))
            i += 1

    clients = [asyncio.ensure_future(client(n)) for n in range(4)]
    await _until(lambda: len(embed.batches) >= 3)
    background = asyncio.ensure_future(batcher.submit(seqs(BACKGROUND, 6), background=True))
    await _until(lambda: len(embed.batches) >= 30)
    stop.set()
    await asyncio.gather(*clients)
    vectors, _, _ = await asyncio.wait_for(background, 30)  # (a hang guard, not a timing)
    np.testing.assert_array_equal(vectors, embed.backend.embed(seqs(BACKGROUND, 6)))
    lanes = embed.lanes()
    last_online = len(lanes) - 1 - lanes[::-1].index("online")
    # Every client came back within the guard: no background batch ran while they were active.
    assert "batch" not in lanes[:last_online], lanes
    assert lanes[last_online + 1:] == ["batch"] * (len(lanes) - last_online - 1)
    assert batcher.background_requests == 0 and batcher.queued_requests == 0


async def test_background_work_has_its_own_bounds_and_never_refuses_online_requests() -> None:
    embed = Recorder(delay_s=0.2)
    batcher = make(embed, max_queue_requests=2)
    queued = [asyncio.ensure_future(batcher.submit(seqs(BACKGROUND + 10 * i, 1), background=True))
              for i in range(2)]
    await asyncio.sleep(0)
    assert batcher.background_requests == 2 and batcher.queued_requests == 0
    with pytest.raises(ServiceError) as refused:
        await batcher.submit(seqs(BACKGROUND + 50, 1), background=True)
    assert refused.value.kind is ErrorKind.OVERLOADED
    online = [asyncio.ensure_future(batcher.submit(seqs(ONLINE + i, 1))) for i in range(2)]
    await asyncio.sleep(0)
    assert batcher.queued_requests == 2
    with pytest.raises(ServiceError):  # the online lane's own bound still holds
        await batcher.submit(seqs(ONLINE + 9, 1))
    await asyncio.gather(*online, *queued)
    assert batcher.background_requests == 0 and batcher.background_tokens == 0


async def test_a_cancelled_background_job_is_dropped_and_close_fails_the_rest() -> None:
    embed = Recorder(delay_s=0.1)
    batcher = make(embed)
    blocker = asyncio.ensure_future(batcher.submit(seqs(ONLINE, 1)))
    await _until(lambda: embed.batches)
    doomed = asyncio.ensure_future(batcher.submit(seqs(BACKGROUND, 5), background=True))
    waiting = asyncio.ensure_future(batcher.submit(seqs(BACKGROUND + 100, 5), background=True))
    await asyncio.sleep(0)
    doomed.cancel()
    await blocker
    await _until(lambda: len(embed.batches) >= 2)
    await batcher.close(ServiceError(ErrorKind.DRAINING, "shutting down"))
    outcome = await asyncio.wait_for(asyncio.gather(waiting, return_exceptions=True), 5)
    assert isinstance(outcome[0], ServiceError)
    assert all(first >= BACKGROUND + 100 for batch in embed.batches[1:] for first in batch), embed.batches


async def test_background_work_fills_only_idle_gaps_as_long_as_its_own_batches() -> None:
    """A client that pauses 10 ms between requests leaves gaps far shorter than a background batch (200 ms):
    once one has been measured, none starts in such a gap (it would hold up the client's next request)."""
    embed = Recorder(delay_s=0.2)
    batcher = make(embed)  # (no guard for answered clients: the idle-gap rule alone)
    await batcher.submit(seqs(ONLINE - 100, 1))  # online traffic just now
    background = asyncio.ensure_future(batcher.submit(seqs(BACKGROUND, 40), background=True))
    await _until(lambda: len(embed.batches) >= 2)  # the first small background batch: its cost is measured
    measured = len(embed.batches)
    for i in range(6):
        await asyncio.sleep(0.01)
        await batcher.submit(seqs(ONLINE + i, 1))
    assert embed.lanes()[measured:measured + 6] == ["online"] * 6, embed.lanes()
    background.cancel()
