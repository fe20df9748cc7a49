"""The result cache's Redis store (docs/cache.md) against a real redis-server started here (127.0.0.1, a
temp dir): two instances share it, it outlives an app's restart, entries expire, different numerics never
share an entry, and a Redis outage fails no request."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.engine.engine import EmbeddingEngine
from embedding_service.engine.result_cache import ResultCache
from embedding_service.engine.types import EmbedRequest
from embedding_service.service import build_embedding_engine, plan_service
from tests.conftest import engine_options, fake_app, free_port, has_module, make_settings, missing

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    def __init__(self, folder: Path) -> None:
        assert REDIS_SERVER is not None
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "",
             "--appendonly", "no", "--protected-mode", "yes"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.client.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None or not has_module("redis"):
        missing("redis-server or the redis package is missing (.ci/run installs both)",
                "redis-server (apt-get install redis-server) or the redis package is not installed")
    server = RedisServer(tmp_path)
    yield server
    server.stop()


async def _instance(url: str, memory_bytes: int = 1 << 20) -> EmbeddingEngine:
    """One server instance's engine: its own memory cache, the shared Redis."""
    from embedding_service.engine.redis_store import RedisStore

    cache = ResultCache(memory_bytes, RedisStore(url, ttl_s=600))
    engine = EmbeddingEngine(FakeBackend(dimension=64, max_model_len=64), engine_options(max_model_len=64),
                             cache.for_model("fake"))
    await engine.start()
    return engine


async def test_instances_share_it_and_it_outlives_a_restart(redis_server: RedisServer) -> None:
    body = {"input": ["shared between instances", "and kept"], "encoding_format": "base64"}
    one, two = await _instance(redis_server.url), await _instance(redis_server.url)
    try:
        async with fake_app(engine=one) as first, fake_app(engine=two) as second:
            computed = await first.http.post("/v1/embeddings", json=body)
            shared = await second.http.post("/v1/embeddings", json=body)
        assert computed.headers["x-embedding-cache"] == "miss" and shared.headers["x-embedding-cache"] == "hit"
        assert shared.json()["data"] == computed.json()["data"]
        assert isinstance(two.backend, FakeBackend) and two.backend.batches == []  # no forward on the second
        assert two.result_cache is not None and two.result_cache.stats.redis_hits == 2
    finally:
        await one.stop()
        await two.stop()
    restarted = await _instance(redis_server.url)  # a fresh process's memory: empty
    try:
        async with fake_app(engine=restarted) as app:
            again = await app.http.post("/v1/embeddings", json=body)
        assert again.headers["x-embedding-cache"] == "hit" and again.json()["data"] == computed.json()["data"]
    finally:
        await restarted.stop()
    keys = redis_server.client.keys("es:rc1:*")
    assert len(keys) == 2 and all(0 < redis_server.client.pttl(key) <= 600_000 for key in keys)  # they expire


async def test_without_memory_it_answers_from_redis(redis_server: RedisServer) -> None:
    engine = await _instance(redis_server.url, memory_bytes=0)
    try:
        assert (await engine.embed(EmbedRequest(texts=["only in redis"]))).cache_state == "miss"
        assert (await engine.embed(EmbedRequest(texts=["only in redis"]))).cache_state == "hit"
        assert engine.result_cache is not None and engine.result_cache.cache.bytes == 0
    finally:
        await engine.stop()


async def test_different_numerics_never_share_an_entry(redis_server: RedisServer) -> None:
    """Two instances of the same model, fp32 and bf16, on one Redis: each computes its own vectors."""
    from embedding_service.service import open_result_cache

    engines = []
    for dtype in ("float32", "bfloat16"):
        plan = plan_service(make_settings(engine="fake", dtype=dtype, result_cache_redis=redis_server.url))
        engines.append(build_embedding_engine(plan.embed, open_result_cache(plan.result_cache)))
        await engines[-1].start()
    try:
        for engine in engines:
            assert (await engine.embed(EmbedRequest(texts=["one text"]))).cache_state == "miss"
        assert len(redis_server.client.keys("es:rc1:*")) == 2
    finally:
        for engine in engines:
            await engine.stop()


async def test_an_outage_fails_no_request(redis_server: RedisServer) -> None:
    engine = await _instance(redis_server.url, memory_bytes=0)
    try:
        async with fake_app(engine=engine) as app:
            before = await app.http.post("/v1/embeddings", json={"input": ["before the outage"]})
            redis_server.stop()
            during = [await app.http.post("/v1/embeddings", json={"input": ["before the outage", f"new {i}"]})
                      for i in range(3)]
            metrics = (await app.http.get("/metrics")).text
        assert before.status_code == 200
        assert [r.status_code for r in during] == [200] * 3
        assert [r.headers["x-embedding-cache"] for r in during] == ["miss"] * 3
        assert during[0].json()["data"][0]["embedding"] == before.json()["data"][0]["embedding"]
        store = engine.result_cache.cache.redis if engine.result_cache is not None else None
        assert store is not None and getattr(store, "errors", 0) == 1  # then paused: no call per request
        assert "embedding_result_cache_redis_errors_total 1.0" in metrics
    finally:
        await engine.stop()


@pytest.mark.slow
def test_two_served_instances_share_it_from_their_flags(redis_server: RedisServer) -> None:
    """The flag's whole path (CLI -> plan -> engines): two real server processes on one Redis."""
    import httpx

    from tests.conftest import serving

    body = {"input": ["one text, two servers"], "encoding_format": "base64"}
    args = ["--engine", "fake", "--served-model-name", "shared", "--result-cache-redis", redis_server.url]
    for first in serving(args):
        for second in serving([*args, "--result-cache-bytes", "0"]):
            computed = httpx.post(first.url + "/v1/embeddings", json=body, timeout=30)
            shared = httpx.post(second.url + "/v1/embeddings", json=body, timeout=30)
            metrics = httpx.get(second.url + "/metrics", timeout=30).text
    assert (computed.headers["x-embedding-cache"], shared.headers["x-embedding-cache"]) == ("miss", "hit")
    assert shared.json()["data"] == computed.json()["data"]
    assert 'embedding_result_cache_redis_hits_total{model="shared"} 1.0' in metrics
