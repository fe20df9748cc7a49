"""Backend faults: a failing batch fails only its requests; a dead engine fails everything fast."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import httpx
import pytest

from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.logging_config import RequestIdFilter

from .conftest import fake_app

NO_HANG_S = 10.0  # every call below must finish well within this, or the test fails (no hangs)


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(RequestIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    handler = Recorder()
    logger = logging.getLogger("embedding_service")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


async def post(http: httpx.AsyncClient, text: str) -> httpx.Response:
    return await asyncio.wait_for(http.post("/v1/embeddings", json={"input": text}), NO_HANG_S)


async def test_a_failing_batch_fails_only_its_requests(recorder: Recorder) -> None:
    # Batch 0 is slow (0.5 s) so that the next three requests queue behind it and form batch 1 together:
    # an idle backend takes a lone request at once, so without a busy batch 0 the grouping would be a race.
    backend = FakeBackend(dimension=16, max_model_len=64, delay_s=0.5, fail_batches=[1])
    fatal: list[BaseException] = []
    options = {"max_batch_size": 3, "batch_timeout_ms": 0}
    async with fake_app(backend=backend, options=options, on_fatal=fatal.append) as served:
        http = served.http
        first = asyncio.ensure_future(post(http, "first"))
        while not backend.batches:  # wait until batch 0 is running
            await asyncio.sleep(0.005)
        # Three concurrent requests fill batch 1, which raises: all three get the 500 envelope.
        failed = await asyncio.gather(*(post(http, f"text {i}") for i in range(3)))
        assert (await first).status_code == 200
        assert backend.batches == [1, 3]
        for response in failed:
            assert response.status_code == 500
            assert response.json()["error"]["code"] == "backend_error"
            assert response.json()["error"]["type"] == "server_error"
            assert "Traceback" not in response.text
        # The engine is still healthy and serves the next batch.
        assert (await post(http, "after")).status_code == 200
        assert (await http.get("/health")).status_code == 200
        assert fatal == []
        # Each failed request is logged with its request id.
        logged = {r.request_id for r in recorder.records if "failed with its batch" in r.getMessage()}  # type: ignore[attr-defined]
        assert logged == {r.headers["x-request-id"] for r in failed}


async def test_a_dead_engine_fails_in_flight_and_queued_requests_at_once() -> None:
    # Batch 0 is slow (0.3 s) so the others queue behind it; batch 1 dies.
    backend = FakeBackend(dimension=16, max_model_len=64, delay_s=0.3, die_after=1)
    fatal: list[BaseException] = []
    options = {"max_batch_size": 1, "batch_timeout_ms": 0}
    async with fake_app(backend=backend, options=options, on_fatal=fatal.append) as served:
        http = served.http
        first = asyncio.ensure_future(post(http, "first"))
        await asyncio.sleep(0.1)  # batch 0 is running
        rest = await asyncio.gather(*(post(http, f"queued {i}") for i in range(4)))
        assert (await first).status_code == 200
        assert [r.status_code for r in rest] == [503] * 4
        assert {r.json()["error"]["code"] for r in rest} == {"engine_unhealthy"}
        assert len(backend.batches) == 2  # only the dying batch ran: the queued ones were failed, not run
        health = await http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        # The probe says which model died and why (the reason the supervisor will restart it).
        assert health.json()["error"] == f"model '{backend.load().model}' (embed) died: fake backend died"
        late = await post(http, "late")
        assert late.status_code == 503 and late.json()["error"]["code"] == "engine_unhealthy"
        await asyncio.sleep(0.05)
        assert len(fatal) == 1  # the server is told once, to exit for its supervisor
        assert str(fatal[0]) == health.json()["error"]
