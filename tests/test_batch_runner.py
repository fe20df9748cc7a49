"""The batch runner in process (fake engine): expiry, a full disk, the storage limit, retention, and online
requests going first. Real server processes, the SDK and kill -9 are in test_batch_api.py."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from embedding_service.api.app import create_app
from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.batch import BatchApi
from embedding_service.batch.disk import Disk
from embedding_service.engine.engine import EmbeddingEngine

from .conftest import engine_options, in_process_client, make_settings

DONE = ("completed", "failed", "cancelled", "expired")


@asynccontextmanager
async def batch_app(data_dir: Path, *, delay_ms: float = 0.0, **settings: Any
                    ) -> AsyncIterator[tuple[httpx.AsyncClient, BatchApi, EmbeddingEngine]]:
    engine = EmbeddingEngine(FakeBackend(dimension=16, max_model_len=64, delay_s=delay_ms / 1000),
                             engine_options(max_model_len=64, batch_timeout_ms=0))
    await engine.start()
    app = create_app(make_settings(engine="fake", served_model_name="fake-model", data_dir=str(data_dir),
                                   **settings), engine)
    api: BatchApi = app.state.batch_api
    try:
        async with in_process_client(app) as http:
            assert (await http.get("/health")).status_code == 200  # builds the middleware stack the lines enter
            api.runner.start()
            yield http, api, engine
    finally:
        await api.runner.stop()
        api.store.close()
        api.disk.close()
        await engine.stop()


def _corpus(lines: int) -> bytes:
    return b"".join(orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings",
                                  "body": {"input": f"text {i}"}}) + b"\n" for i in range(lines))


async def _submit(http: httpx.AsyncClient, content: bytes) -> dict[str, Any]:
    uploaded = await http.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"})
    assert uploaded.status_code == 200, uploaded.text
    made = await http.post("/v1/batches", json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/embeddings",
                                                "completion_window": "24h"})
    assert made.status_code == 200, made.text
    return made.json()


async def _wait(http: httpx.AsyncClient, batch_id: str, until: tuple[str, ...] = DONE) -> dict[str, Any]:
    for _ in range(600):
        batch = (await http.get(f"/v1/batches/{batch_id}")).json()
        if batch["status"] in until:
            return batch
        await asyncio.sleep(0.02)
    raise AssertionError(f"batch still {batch['status']}")


async def test_past_its_window_a_batch_expires_and_the_rest_is_reported(tmp_path: Path) -> None:
    async with batch_app(tmp_path, delay_ms=5, batch_concurrency=4) as (http, api, _):  # (chunks of 16 lines)
        batch = await _submit(http, _corpus(200))
        await _wait(http, batch["id"], ("in_progress",))
        await api.store.call(lambda: api.store.update_batch(batch["id"], expires_at=int(time.time()) - 1))
        done = await _wait(http, batch["id"])
        assert done["status"] == "expired" and done["expired_at"]
        counts = done["request_counts"]
        assert counts["total"] == 200 and counts["completed"] + counts["failed"] == 200 and counts["failed"] > 0
        errors = [orjson.loads(x) for x in (await http.get(f"/v1/files/{done['error_file_id']}/content")).content
                  .splitlines()]
        assert len(errors) == counts["failed"]
        assert {e["error"]["code"] for e in errors} == {"batch_expired"} and errors[-1]["custom_id"] == "r199"


async def test_a_full_disk_fails_the_batch_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    async with batch_app(tmp_path) as (http, _, _engine):
        monkeypatch.setattr(Disk, "append", full)
        done = await _wait(http, (await _submit(http, _corpus(5)))["id"])
        assert done["status"] == "failed"
        assert done["errors"]["data"][0]["code"] == "storage_error"
        assert "No space left" in done["errors"]["data"][0]["message"]
        monkeypatch.undo()
        again = await _wait(http, (await _submit(http, _corpus(5)))["id"])  # the store still works
        assert again["status"] == "completed"


async def test_the_storage_limit_refuses_uploads_and_fails_a_batch_that_outgrows_it(tmp_path: Path) -> None:
    async with batch_app(tmp_path, batch_max_stored_bytes=6000) as (http, _, _engine):
        done = await _wait(http, (await _submit(http, _corpus(40)))["id"])  # 2 KB in, ~40 x 200 B out
        assert done["status"] == "failed" and done["errors"]["data"][0]["code"] == "storage_full"
        answer = await http.post("/v1/files", files={"file": ("in.jsonl", b"x" * 5000)}, data={"purpose": "batch"})
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "storage_full"


async def test_retention_deletes_old_files(tmp_path: Path) -> None:
    async with batch_app(tmp_path) as (http, api, _):
        done = await _wait(http, (await _submit(http, _corpus(3)))["id"])
        out = done["output_file_id"]
        await api.store.call(lambda: api.store._conn.execute("UPDATE files SET expires_at = 0") and None)
        await api.runner.housekeep()
        assert (await http.get(f"/v1/files/{out}")).status_code == 404
        assert not list((tmp_path / "files").iterdir())


async def test_the_batch_yields_the_engine_to_online_requests(tmp_path: Path) -> None:
    """While online requests keep the engine busy the batch admits no new line; once they stop it goes on."""
    async with batch_app(tmp_path, delay_ms=10, batch_concurrency=4) as (http, _, _engine):
        batch = await _submit(http, _corpus(2000))
        await _wait(http, batch["id"], ("in_progress",))

        async def done() -> int:
            return int((await http.get(f"/v1/batches/{batch['id']}")).json()["request_counts"]["completed"])

        async def lines_in(seconds: float) -> int:
            start = await done()
            await asyncio.sleep(seconds)
            return await done() - start

        idle = await lines_in(1.0)
        stop = asyncio.Event()

        async def online_client() -> None:
            while not stop.is_set():
                assert (await http.post("/v1/embeddings", json={"input": ["online"] * 8})).status_code == 200

        clients = [asyncio.create_task(online_client()) for _ in range(4)]
        await asyncio.sleep(0.2)  # (the lines admitted before the load finish: their chunk is committed)
        busy = await lines_in(1.0)
        stop.set()
        await asyncio.gather(*clients)
        after = await lines_in(1.0)
        assert idle > 20 and after > 20, (idle, busy, after)
        assert busy < idle / 4, (idle, busy, after)


async def test_a_cancel_stops_lines_waiting_behind_online_traffic(tmp_path: Path) -> None:
    """Lines queued in the engine's background lane while online requests keep it busy are dropped by a
    cancel (they would wait as long as the load lasts); what was done stays."""
    async with batch_app(tmp_path, delay_ms=10, batch_concurrency=8) as (http, api, engine):
        stop = asyncio.Event()

        async def online_client() -> None:
            while not stop.is_set():
                assert (await http.post("/v1/embeddings", json={"input": ["online"] * 8})).status_code == 200

        clients = [asyncio.create_task(online_client()) for _ in range(4)]
        try:
            batch = await _submit(http, _corpus(500))
            while engine.background_requests < 8:  # the lines wait in the engine, behind the load
                await asyncio.sleep(0.01)
            assert api.runner.stats.in_flight == 8
            assert (await http.post(f"/v1/batches/{batch['id']}/cancel")).status_code == 200
            ended = await asyncio.wait_for(_wait(http, batch["id"], DONE), 30)  # (a hang guard)
        finally:
            stop.set()
            await asyncio.gather(*clients)
        assert ended["status"] == "cancelled"
        assert engine.background_requests == 0 and api.runner.stats.in_flight == 0
        metrics = (await http.get("/metrics")).text
        assert 'embedding_queue_background_requests{model="fake-model"} 0.0' in metrics
        busy = {lane: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                for lane in ("online", "batch") if line.startswith("embedding_engine_busy_seconds_total")
                and f'lane="{lane}"' in line}
        assert busy["online"] > 0 and busy["batch"] >= 0, busy


async def test_bad_uploads_get_clear_4xx(tmp_path: Path) -> None:
    async with batch_app(tmp_path, batch_max_file_bytes=4096) as (http, _, _engine):
        async def status(**kwargs: Any) -> tuple[int, str | None]:
            answer = await http.post("/v1/files", **kwargs)
            return answer.status_code, answer.json()["error"]["param"] or answer.json()["error"]["code"]

        line = _corpus(1)
        assert await status(json={"file": "x"}) == (415, "unsupported_media_type")
        assert await status(data={"purpose": "batch"}, files={"other": ("a", b"")}) == (400, "file")
        assert await status(files={"file": ("in.jsonl", line)}) == (400, "purpose")
        assert await status(files={"file": ("in.jsonl", b"")}, data={"purpose": "batch"}) == (400, "file")
        two = {"files": [("file", ("a.jsonl", line)), ("file", ("b.jsonl", line))], "data": {"purpose": "batch"}}
        assert (await status(**two))[0] == 400
        garbled = {"content": b"--nope\r\nhello", "headers": {"content-type": "multipart/form-data; boundary=x"}}
        assert (await status(**garbled))[0] == 400

        async def endless() -> AsyncIterator[bytes]:  # chunked, no content-length: cut off at the limit
            yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n"
            for _ in range(100):
                yield b"x" * 1024

        big = await http.post("/v1/files", content=endless(),
                              headers={"content-type": "multipart/form-data; boundary=b"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "file_too_large"
        assert not list((tmp_path / "files").iterdir()) and not list((tmp_path / "tmp").iterdir())


def test_one_server_per_data_dir(tmp_path: Path) -> None:
    first = Disk(tmp_path)
    try:
        with pytest.raises(RuntimeError, match="in use by another server process"):
            Disk(tmp_path)
    finally:
        first.close()
    Disk(tmp_path).close()  # free again once the first let go


async def test_the_next_chunk_starts_before_the_one_before_is_written(tmp_path: Path) -> None:
    """No drained pipeline between durable steps: the last line of a chunk is still waiting while lines of the next
    chunk run (with chunks run one after the other it waits in vain), and the output stays in order."""
    async with batch_app(tmp_path, batch_concurrency=4) as (http, api, _):  # chunks of 16 lines, 4 in flight
        posted_later = asyncio.Event()
        overlapped = []
        invoker, post = api.runner.invoker, api.runner.invoker.post

        async def spying_post(path: str, body: bytes, **kw: Any) -> Any:
            index = int(orjson.loads(body)["input"].split()[1])
            if index >= 16:
                posted_later.set()
            if index == 15:  # the first chunk's last line waits for a line of the second chunk
                try:
                    await asyncio.wait_for(posted_later.wait(), 5.0)
                    overlapped.append(True)
                except TimeoutError:
                    overlapped.append(False)
            return await post(path, body, **kw)

        invoker.post = spying_post  # type: ignore[method-assign]
        batch = await _submit(http, _corpus(40))
        done = await _wait(http, batch["id"])
        assert done["status"] == "completed" and overlapped == [True]
        out = [orjson.loads(x) for x in (await http.get(f"/v1/files/{done['output_file_id']}/content")).content
               .splitlines()]
        assert [line["custom_id"] for line in out] == [f"r{i}" for i in range(40)]
