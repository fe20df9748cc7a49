"""The dynamic batcher: merging, bounds, per-request results, failures, cancellation, backpressure."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.engine.batcher import Batcher, BatchPolicy
from embedding_service.errors import ErrorKind, ServiceError

pytestmark = pytest.mark.asyncio


def make(backend: FakeBackend, **kwargs: object) -> Batcher:
    options: dict = {"max_batch_size": 8, "max_batch_tokens": 10_000, "batch_timeout_s": 0.02, "padded": False,
                     "max_concurrent_batches": 1, "max_queue_requests": 1024, "max_queue_tokens": 1_000_000}
    options.update(kwargs)
    batcher = Batcher(backend.embed, ThreadPoolExecutor(1), BatchPolicy(**options))
    batcher.start()
    return batcher


def seqs(start: int, count: int, length: int = 3) -> list[list[int]]:
    return [[start + i] * length for i in range(count)]


async def test_concurrent_requests_share_batches_and_keep_their_order() -> None:
    backend = FakeBackend()
    batcher = make(backend)
    requests = [seqs(100 * r, 3) for r in range(6)]
    results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    assert sum(backend.batches) == 18
    assert max(backend.batches) > 3, backend.batches  # several requests were merged
    assert all(size <= 8 for size in backend.batches)
    for request, (vectors, _queued, _compute) in zip(requests, results, strict=True):
        np.testing.assert_array_equal(vectors, backend.embed(request))


async def test_a_large_request_is_split_and_reassembled() -> None:
    backend = FakeBackend()
    batcher = make(backend, max_batch_size=4)
    request = seqs(1, 10)
    vectors, _, _ = await batcher.submit(request)
    assert backend.batches[:3] == [4, 4, 2]
    np.testing.assert_array_equal(vectors, backend.embed(request))


async def test_token_budget_bounds_padded_batches() -> None:
    backend = FakeBackend()
    batcher = make(backend, max_batch_tokens=40, padded=True)
    request = [[1] * 10 for _ in range(9)]  # 10 tokens each: at most 4 fit under 40 padded tokens
    await batcher.submit(request)
    assert backend.batches == [4, 4, 1]


async def test_a_failing_batch_fails_only_its_requests() -> None:
    backend = FakeBackend(fail_batches=[0])
    batcher = make(backend, batch_timeout_s=0.0, max_batch_size=2)
    first = asyncio.ensure_future(batcher.submit(seqs(1, 2)))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(batcher.submit(seqs(50, 2)))
    done = await asyncio.gather(first, second, return_exceptions=True)
    assert isinstance(done[0], RuntimeError)
    assert isinstance(done[1], tuple)


async def test_queue_bound_refuses_at_once_with_retry_after() -> None:
    backend = FakeBackend(delay_s=0.2)
    batcher = make(backend, max_queue_requests=2, batch_timeout_s=0.0)
    running = [asyncio.ensure_future(batcher.submit(seqs(i, 1))) for i in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(ServiceError) as refused:
        await batcher.submit(seqs(9, 1))
    assert refused.value.kind is ErrorKind.OVERLOADED and refused.value.retry_after_s
    await asyncio.gather(*running)
    await batcher.submit(seqs(9, 1))  # room again


async def test_cancelled_request_is_dropped_from_the_queue() -> None:
    backend = FakeBackend(delay_s=0.1)
    batcher = make(backend, max_batch_size=1, batch_timeout_s=0.0)
    blocker = asyncio.ensure_future(batcher.submit(seqs(1, 1)))
    await asyncio.sleep(0.02)
    doomed = asyncio.ensure_future(batcher.submit(seqs(2, 5)))
    await asyncio.sleep(0.01)
    doomed.cancel()
    await blocker
    await asyncio.sleep(0.05)
    assert sum(backend.batches) == 1  # none of the cancelled request's five sequences ran
    assert batcher.queued_requests == 0 and batcher.queued_tokens == 0


async def test_close_fails_waiting_requests_instead_of_leaving_them_hanging() -> None:
    backend = FakeBackend(delay_s=0.2)
    batcher = make(backend, max_batch_size=1, batch_timeout_s=0.0)
    waiting = [asyncio.ensure_future(batcher.submit(seqs(i, 1))) for i in range(3)]
    await asyncio.sleep(0.02)
    await batcher.close(ServiceError(ErrorKind.DRAINING, "shutting down"))
    outcomes = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
    assert any(isinstance(o, ServiceError) for o in outcomes)


async def test_padded_batches_group_similar_lengths_oldest_first() -> None:
    backend = FakeBackend(delay_s=0.3)
    batcher = make(backend, max_batch_size=4, padded=True, batch_timeout_s=0.0)
    blocker = asyncio.ensure_future(batcher.submit([[7] * 3]))  # keeps the backend busy while the rest queue
    while not backend.batches:
        await asyncio.sleep(0.005)
    lengths = [100, 3, 100, 3, 100, 3, 100, 3]
    requests = [[[i + 10] * n] for i, n in enumerate(lengths)]
    results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    await blocker
    assert backend.batches[1:] == [4, 4]
    seen = backend.seen_lengths[1:]
    assert sorted(seen[0]) == [100, 100, 100, 100] and sorted(seen[1]) == [3, 3, 3, 3]
    for request, (vectors, _q, _c) in zip(requests, results, strict=True):
        np.testing.assert_array_equal(vectors, backend.embed(request))
