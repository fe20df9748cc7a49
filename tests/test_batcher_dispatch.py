"""The batcher's wait policy: dispatch at once when the backend is idle, gather while it is busy."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from embedding_service.engine.batcher import Batcher, BatchPolicy


class GatedEmbed:
    """An embed function whose calls block until released, recording each batch's size."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.entered = threading.Semaphore(0)
        self.gate = threading.Event()

    def __call__(self, seqs):  # type: ignore[no-untyped-def]
        self.sizes.append(len(seqs))
        self.entered.release()
        self.gate.wait(30)
        return np.ones((len(seqs), 4), dtype=np.float32)


def _policy(batch_timeout_s: float, max_batch_size: int = 32) -> BatchPolicy:
    return BatchPolicy(max_batch_size=max_batch_size, max_batch_tokens=10_000, batch_timeout_s=batch_timeout_s,
                       padded=True, max_concurrent_batches=1, max_queue_requests=1024, max_queue_tokens=1_000_000)


async def test_idle_backend_gets_a_lone_request_without_waiting_for_the_timeout() -> None:
    embed = GatedEmbed()
    embed.gate.set()
    with ThreadPoolExecutor(1) as pool:
        # A 10-minute fill window: if the idle batcher waited for it, wait_for would time out.
        batcher = Batcher(embed, pool, _policy(600.0))
        batcher.start()
        vectors, _queued, _compute = await asyncio.wait_for(batcher.submit([[1, 2, 3]]), 30)
        assert vectors.shape == (1, 4)
        assert embed.sizes == [1]
        await batcher.close(RuntimeError("closed"))  # type: ignore[arg-type]


async def test_requests_arriving_while_busy_go_out_together() -> None:
    embed = GatedEmbed()
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(embed, pool, _policy(0.005))
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([[1, 2]]))
        await asyncio.get_running_loop().run_in_executor(None, embed.entered.acquire)  # backend now busy
        rest = [asyncio.ensure_future(batcher.submit([[3, i]])) for i in range(5)]
        await asyncio.sleep(0)
        embed.gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, *rest), 30)
        assert [r[0].shape for r in results] == [(1, 4)] * 6
        assert embed.sizes == [1, 5]
        await batcher.close(RuntimeError("closed"))  # type: ignore[arg-type]


async def test_an_idle_backend_waits_for_requests_still_being_tokenised() -> None:
    """Clients answered by one batch come back together: the first back must not go out alone."""
    embed = GatedEmbed()
    embed.gate.set()
    incoming = [3]
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(embed, pool, _policy(600.0), incoming=lambda: incoming[0])
        batcher.start()
        jobs = []
        for i in range(3):
            incoming[0] -= 1  # tokenised: submitted next, as the engine does, without yielding in between
            jobs.append(asyncio.ensure_future(batcher.submit([[i, 1]])))
            await asyncio.sleep(0.02)  # the next one is still being tokenised
        await asyncio.wait_for(asyncio.gather(*jobs), 30)
        assert embed.sizes == [3]
        await batcher.close(RuntimeError("closed"))  # type: ignore[arg-type]


async def test_waiting_for_incoming_work_is_bounded_and_ends_when_it_is_refused() -> None:
    embed = GatedEmbed()
    embed.gate.set()
    incoming = [1]  # never submitted: stuck, or refused
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(embed, pool, _policy(0.05), incoming=lambda: incoming[0])
        batcher.start()
        started = time.perf_counter()
        await asyncio.wait_for(batcher.submit([[1]]), 30)  # goes out after batch_timeout at most
        assert time.perf_counter() - started < 5 and embed.sizes == [1]
        await batcher.close(RuntimeError("closed"))  # type: ignore[arg-type]
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(embed, pool, _policy(600.0), incoming=lambda: incoming[0])
        batcher.start()
        job = asyncio.ensure_future(batcher.submit([[2]]))
        await asyncio.sleep(0.05)
        assert not job.done()  # waiting for the incoming one
        incoming[0] = 0
        batcher.wake()  # the engine refused it
        await asyncio.wait_for(job, 30)
        assert embed.sizes == [1, 1]
        await batcher.close(RuntimeError("closed"))  # type: ignore[arg-type]


@pytest.mark.parametrize("task", ["embed", "rerank"])
async def test_concurrent_requests_to_an_idle_engine_share_one_batch(task: str) -> None:
    from embedding_service.backends.fake.embed import FakeBackend
    from embedding_service.backends.fake.scoring import FakeScoringBackend
    from embedding_service.engine.engine import EmbeddingEngine, EngineOptions
    from embedding_service.engine.rerank import RerankEngine, ScoreRequest
    from embedding_service.engine.types import EmbedRequest

    from .conftest import make_settings

    options = EngineOptions.from_config(make_settings(engine="fake"))
    engine = (EmbeddingEngine(FakeBackend(), options) if task == "embed"
              else RerankEngine(FakeScoringBackend(), options, max_documents=100))
    await engine.start()
    sizes: list[int] = []
    engine.on_batch = lambda size, _tokens, _seconds: sizes.append(size)
    try:
        if isinstance(engine, RerankEngine):
            await asyncio.gather(*(engine.score(ScoreRequest(queries=["cat"], documents=[f"cat {i}"]))
                                   for i in range(16)))
        else:
            await asyncio.gather(*(engine.embed(EmbedRequest(texts=[f"text {i}"])) for i in range(16)))
        assert sizes == [16]
    finally:
        await engine.stop()


async def _answer_together(batcher: Batcher, clients: int) -> None:
    await asyncio.wait_for(asyncio.gather(*(batcher.submit([[9, i]]) for i in range(clients))), 30)


@contextlib.asynccontextmanager
async def _open_batcher(batch_timeout_s: float) -> AsyncIterator[tuple[Batcher, GatedEmbed]]:
    """A started batcher over an embed function that answers at once, closed afterwards."""
    embed = GatedEmbed()
    embed.gate.set()
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(embed, pool, _policy(batch_timeout_s))
        batcher.start()
        try:
            yield batcher, embed
        finally:
            await batcher.close(RuntimeError("closed"))  # type: ignore[arg-type]


async def test_clients_answered_together_share_a_batch_when_they_come_back() -> None:
    """Over HTTP the clients one batch answered come back milliseconds apart: the first must not go alone."""
    async with _open_batcher(600.0) as (batcher, embed):
        await _answer_together(batcher, 4)

        async def come_back(delay: float) -> None:
            await asyncio.sleep(delay)
            await batcher.submit([[7, 7]])

        await asyncio.wait_for(asyncio.gather(*(come_back(0.02 * i) for i in range(4))), 30)
        assert embed.sizes == [4, 4]


async def test_a_lone_client_coming_back_never_waits() -> None:
    async with _open_batcher(600.0) as (batcher, embed):  # any wait would hit wait_for's 30 s
        for _ in range(3):
            await asyncio.wait_for(batcher.submit([[1, 2]]), 30)
        assert embed.sizes == [1, 1, 1]


async def test_waiting_for_returning_clients_is_bounded_by_the_timeout() -> None:
    async with _open_batcher(0.2) as (batcher, embed):
        await _answer_together(batcher, 4)
        started = time.perf_counter()
        await asyncio.wait_for(batcher.submit([[5]]), 30)  # one of four comes back: waits, then goes alone
        assert 0.15 <= time.perf_counter() - started < 5
        assert embed.sizes == [4, 1]

        await _answer_together(batcher, 4)
        await asyncio.sleep(0.3)  # past batch_timeout since the answer: nobody is expected any more
        late = asyncio.ensure_future(batcher.submit([[6]]))
        await asyncio.sleep(0.05)
        assert late.done()  # went out at once, without waiting for the other three
        await asyncio.wait_for(late, 30)
        assert embed.sizes == [4, 1, 4, 1]


async def test_the_next_batch_starts_before_the_answered_requests_resume() -> None:
    """Responses of the batch just answered take the event loop a while (~10 ms at 64 clients): the backend
    must already be busy with the next (full) batch meanwhile, not wait for them."""
    events: list[str] = []

    class RecordingPool(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
            events.append("backend starts a batch")
            return super().submit(fn, *args, **kwargs)

    embed = GatedEmbed()
    with RecordingPool(1) as pool:
        batcher = Batcher(embed, pool, _policy(0.005, max_batch_size=1))
        batcher.start()

        async def first() -> None:
            await batcher.submit([[1]])
            events.append("answered request resumes")

        answered = asyncio.ensure_future(first())
        await asyncio.get_running_loop().run_in_executor(None, embed.entered.acquire)  # batch 1 running
        queued = asyncio.ensure_future(batcher.submit([[2]]))
        await asyncio.sleep(0.01)
        embed.gate.set()
        await asyncio.wait_for(asyncio.gather(answered, queued), 30)
        assert events[:3] == ["backend starts a batch", "backend starts a batch", "answered request resumes"]
        await batcher.close(RuntimeError("closed"))  # type: ignore[arg-type]


async def test_a_client_arriving_late_waits_only_until_batch_timeout_after_the_answer() -> None:
    """Open-loop traffic (clients that never come back): the wait for returning clients is counted from the
    answer, so a request arriving late in that window waits only for what is left of it."""
    async with _open_batcher(0.4) as (batcher, embed):
        await _answer_together(batcher, 4)
        await asyncio.sleep(0.3)
        started = time.perf_counter()
        await asyncio.wait_for(batcher.submit([[8]]), 30)
        assert time.perf_counter() - started < 0.25  # ~0.1 s left of the window, not a fresh 0.4 s
        assert embed.sizes == [4, 1]
