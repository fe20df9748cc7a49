"""`api_processes > 1` in one process: the wire format, and remote engines (the API processes' side) over a real
Unix socket to an EngineHost (the engine process's side), against the same engine used directly."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import values as prometheus_values

from embedding_service.api_processes import remote_engines, unsupported
from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.backends.fake.scoring import FakeScoringBackend
from embedding_service.backends.model.pair_tokenizer import TokenPair
from embedding_service.engine import wire
from embedding_service.engine.engine import EmbeddingEngine
from embedding_service.engine.host import EngineHost
from embedding_service.engine.remote import EngineLink, RemoteEmbeddingEngine, RemoteRerankEngine
from embedding_service.engine.rerank import RerankEngine, ScoreRequest
from embedding_service.engine.result_cache import ResultCache
from embedding_service.engine.types import SPARSE, EmbedRequest, EngineState
from embedding_service.errors import ErrorKind, ServiceError
from embedding_service.service import build_engines, plan_service

from .conftest import engine_options, fake_app, make_settings


def test_submit_and_rows_frames_round_trip() -> None:
    seqs = [[5, 6, 7], [1], [2**31 - 1, 0]]
    payload = wire.encode_submit(42, 3, seqs, 12.5)[5:]
    assert wire.decode_submit(payload) == (42, 3, seqs, 12.5)
    pairs = [TokenPair([1, 5, 2, 6, 2], head=3, tail=1, second_start=3), TokenPair([7, 8], head=1, tail=0)]
    _, _, back_pairs, _ = wire.decode_submit(wire.encode_submit(1, 0, pairs, 1.0)[5:])
    assert back_pairs == pairs and [p.second_start for p in back_pairs] == [3, None]  # type: ignore[attr-defined]
    rows = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32)
    request_id, back, queued, compute = wire.decode_rows(wire.encode_rows(9, rows, 0.25, 0.5)[5:])
    assert (request_id, queued, compute) == (9, 0.25, 0.5)
    assert back.dtype == np.float32 and back.tobytes() == rows.tobytes()
    error = ServiceError(ErrorKind.OVERLOADED, "queue full", code="overloaded", retry_after_s=1)
    request_id, again = wire.decode_error(wire.encode_error(7, error)[5:])
    assert request_id == 7
    assert (again.kind, again.message, again.code, again.retry_after_s) == (ErrorKind.OVERLOADED, "queue full",
                                                                            "overloaded", 1)


class Setup:
    def __init__(self, engine: EmbeddingEngine, host: EngineHost, remotes: list[RemoteEmbeddingEngine]) -> None:
        self.engine, self.host, self.remotes = engine, host, remotes


async def _setup(tmp_path: Path, backend: FakeBackend, processes: int, *, cached: bool = False,
                 **options: object) -> Setup:
    """An engine behind a host and `processes` remote engines; `cached`: each remote its own result cache, as
    each API process has."""
    opts = engine_options(**{"max_model_len": 64, "batch_timeout_ms": 2, **options})
    engine = EmbeddingEngine(backend, opts)
    host = EngineHost([engine], processes)
    path = str(tmp_path / "engine.sock")
    await host.start(path)
    remotes = [RemoteEmbeddingEngine(EngineLink(path), 0, opts, "unused",
                                     ResultCache(1 << 20).for_model("fake") if cached else None)
               for _ in range(processes)]
    starting = [asyncio.ensure_future(remote.start()) for remote in remotes]
    await engine.start()
    host.models_loaded()
    await asyncio.gather(*starting)
    return Setup(engine, host, remotes)


async def _close(setup: Setup) -> None:
    for remote in setup.remotes:
        await remote.stop()
    await setup.host.close()
    await setup.engine.stop()


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[Setup]:
    setup = await _setup(tmp_path, FakeBackend(dimension=64, max_model_len=64), 2)
    yield setup
    await _close(setup)


async def test_remote_engines_give_the_local_engines_vectors_byte_for_byte(two: Setup) -> None:
    texts = [f"text number {n} with some words" for n in range(20)]
    local = await two.engine.embed(EmbedRequest(texts=texts, dimensions=32))
    answers = await asyncio.gather(*(remote.embed(EmbedRequest(texts=texts, dimensions=32))
                                     for remote in two.remotes))
    for answer in answers:
        assert answer.vectors.dtype == np.float32 and answer.vectors.shape == (20, 32)
        assert answer.vectors.tobytes() == local.vectors.tobytes()
        assert answer.prompt_tokens == local.prompt_tokens
    assert two.remotes[0].info == two.engine.info
    ids = await two.remotes[1].embed(EmbedRequest(token_ids=[[10, 11, 12]]))
    direct = await two.engine.embed(EmbedRequest(token_ids=[[10, 11, 12]]))
    assert ids.vectors.tobytes() == direct.vectors.tobytes()


async def test_the_api_over_a_remote_engine_answers_as_over_the_local_one(two: Setup) -> None:
    body = {"input": ["alpha beta", "gamma"], "encoding_format": "base64"}
    async with fake_app(engine=two.engine) as local, fake_app(engine=two.remotes[0]) as remote:
        want = await local.http.post("/v1/embeddings", json=body)
        got = await remote.http.post("/v1/embeddings", json=body)
        assert got.status_code == want.status_code == 200
        assert got.json() == want.json()
        too_long = {"input": "word " * 100}
        assert (await remote.http.post("/v1/embeddings", json=too_long)).json() == \
            (await local.http.post("/v1/embeddings", json=too_long)).json()


async def test_each_api_process_answers_its_hits_without_crossing_to_the_engine_process(tmp_path: Path) -> None:
    setup = await _setup(tmp_path, FakeBackend(dimension=64, max_model_len=64), 2, cached=True)
    first, second = setup.remotes
    backend = setup.engine.backend
    assert isinstance(backend, FakeBackend)
    try:
        texts = ["a repeated text", "another one"]
        computed = await first.embed(EmbedRequest(texts=texts))
        crossed = first._link._ids  # (the link's request counter: the next id it would use)
        again = await first.embed(EmbedRequest(texts=texts, dimensions=32))
        assert next(crossed) == 2  # the hit sent nothing over the link ...
        assert len(backend.seen_lengths) == 1  # ... and the engine process ran one batch
        assert again.cached == 2 and again.queue_time_s == again.compute_time_s == 0.0
        cut = await setup.engine.embed(EmbedRequest(texts=texts, dimensions=32))
        assert again.vectors.tobytes() == cut.vectors.tobytes()
        elsewhere = await second.embed(EmbedRequest(texts=texts))  # another API process: its own cache, a miss
        assert elsewhere.cached == 0 and len(backend.seen_lengths) == 3
        uncached = await setup.engine.embed(EmbedRequest(texts=texts))
        assert computed.vectors.tobytes() == elsewhere.vectors.tobytes() == uncached.vectors.tobytes()
    finally:
        await _close(setup)


async def test_api_processes_write_their_cache_counts_where_metrics_sum_them(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """With the multiprocess files on (as in every process of api_processes > 1), /metrics renders the counts
    from the files, where each API process writes its own after each request."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(prometheus_values, "ValueClass", prometheus_values.get_value_class())
    engine = EmbeddingEngine(FakeBackend(dimension=8, max_model_len=64), engine_options(max_model_len=64),
                             ResultCache(1 << 20).for_model("fake"))
    await engine.start()
    try:
        async with fake_app(engine=engine, api_processes=2) as app:
            for _ in range(2):
                await app.http.post("/v1/embeddings", json={"input": ["a", "b"]})
            text = (await app.http.get("/metrics")).text
    finally:
        await engine.stop()
    assert 'embedding_result_cache_hits_total{model="fake-model"} 2.0' in text
    assert 'embedding_result_cache_misses_total{model="fake-model"} 2.0' in text
    assert 'embedding_result_cache_entries{model="fake-model"} 2.0' in text
    assert list(tmp_path.glob("counter_*.db"))  # (from the files, not this process's live values)


def test_api_processes_key_their_caches_as_one_process_would_and_the_engine_process_has_none() -> None:
    plan = plan_service(make_settings(engine="fake", api_processes=2, rerank_model_path="fake-reranker"))
    name = next(iter(plan.models))
    remote, local = remote_engines(plan, "unused.sock")[name], build_engines(plan)[name]
    assert isinstance(remote, RemoteEmbeddingEngine) and isinstance(local, EmbeddingEngine)
    assert remote.result_cache is not None and local.result_cache is not None
    assert remote.result_cache.fingerprint == local.result_cache.fingerprint
    assert remote_engines(dataclasses.replace(plan, result_cache=None), "unused.sock")[name].result_cache is None


async def test_the_engines_queue_bound_holds_across_api_processes(tmp_path: Path) -> None:
    setup = await _setup(tmp_path, FakeBackend(dimension=8, max_model_len=64, delay_s=0.2), 2,
                         max_queue_requests=2, max_batch_size=1)
    try:
        calls = [remote.embed(EmbedRequest(texts=[f"t {n}"])) for n in range(4) for remote in setup.remotes]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, ServiceError)]
        assert refused and all(o.kind is ErrorKind.OVERLOADED and o.retry_after_s for o in refused)
        assert len(outcomes) - len(refused) >= 2  # (the queue's two)
        assert not [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, ServiceError)]
    finally:
        await _close(setup)


async def test_an_engine_death_reaches_every_api_process(tmp_path: Path) -> None:
    setup = await _setup(tmp_path, FakeBackend(dimension=8, max_model_len=64, die_after=0), 2)
    died: list[BaseException] = []
    setup.engine.on_dead = lambda exc: setup.host.model_died(0, setup.engine.death or str(exc))
    for remote in setup.remotes:
        remote.on_dead = died.append
    try:
        with pytest.raises(ServiceError) as caught:
            await setup.remotes[0].embed(EmbedRequest(texts=["boom"]))
        assert caught.value.kind is ErrorKind.UNHEALTHY
        for _ in range(100):
            if len(died) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(died) == 2
        assert all(remote.state is EngineState.UNHEALTHY and "died" in (remote.death or "")
                   for remote in setup.remotes)
        with pytest.raises(ServiceError) as again:
            await setup.remotes[1].embed(EmbedRequest(texts=["after"]))
        assert again.value.status == 503
    finally:
        await _close(setup)


async def test_api_processes_wait_for_all_of_them_to_connect(tmp_path: Path) -> None:
    engine = EmbeddingEngine(FakeBackend(dimension=8, max_model_len=64), engine_options(max_model_len=64))
    host = EngineHost([engine], 2)
    path = str(tmp_path / "engine.sock")
    await host.start(path)
    await engine.start()
    host.models_loaded()
    first = RemoteEmbeddingEngine(EngineLink(path), 0, engine.options, "unused")
    starting = asyncio.ensure_future(first.start())
    await asyncio.sleep(0.2)
    assert not starting.done() and first.state is EngineState.LOADING  # the other one has not connected
    second = RemoteEmbeddingEngine(EngineLink(path), 0, engine.options, "unused")
    await asyncio.wait_for(asyncio.gather(starting, second.start()), 5)
    assert first.state is second.state is EngineState.HEALTHY
    late = RemoteEmbeddingEngine(EngineLink(path), 0, engine.options, "unused")  # (a restarted one)
    await asyncio.wait_for(late.start(), 5)
    for each in (first, second, late):
        await each.stop()
    await host.close()
    await engine.stop()


@pytest.mark.parametrize(("settings", "named"), [
    ({"workers": 2}, "workers=2"),
    ({"data_dir": "/tmp/x"}, "data_dir"),
    ({"rate_limit_rpm": 10}, "rate_limit_rpm"),
])
def test_what_api_processes_cannot_serve_yet_is_refused_naming_the_setting(settings: dict[str, object],
                                                                            named: str) -> None:
    config = make_settings(engine="fake", api_processes=2, **settings)
    why = unsupported(config, plan_service(config))
    assert why is not None and named in why and "\n" not in why


def test_embedding_models_and_rerankers_are_served_by_api_processes_sparse_ones_not_yet() -> None:
    config = make_settings(engine="fake", api_processes=2, rerank_model_path="fake-reranker")
    plan = plan_service(config)
    assert unsupported(config, plan) is None
    name, model = next(iter(plan.models.items()))
    plan.models[name] = dataclasses.replace(model, role=SPARSE)
    why = unsupported(config, plan)
    assert why is not None and f"'{name}' (sparse)" in why and "api_processes=1" in why


async def test_a_remote_reranker_scores_as_the_local_one(tmp_path: Path) -> None:
    opts = engine_options(max_model_len=64, batch_timeout_ms=2)
    engine = RerankEngine(FakeScoringBackend(max_model_len=64), opts, max_documents=100)
    host = EngineHost([engine], 1)
    path = str(tmp_path / "engine.sock")
    await host.start(path)
    remote = RemoteRerankEngine(EngineLink(path), 0, opts, "unused", max_documents=100)
    starting = asyncio.ensure_future(remote.start())
    await engine.start()
    host.models_loaded()
    await starting
    try:
        documents = ["the cat sat", "a dog ran far away", "cat and dog", "word " * 100]
        request = {"queries": ["cat dog"] * 4, "documents": documents, "truncate": True}
        local, far = await engine.score(ScoreRequest(**request)), await remote.score(ScoreRequest(**request))
        assert far.scores.tobytes() == local.scores.tobytes() and far.prompt_tokens == local.prompt_tokens
        with pytest.raises(ServiceError, match="too many documents"):
            await remote.score(ScoreRequest(queries=["q"] * 101, documents=["d"] * 101))
    finally:
        await remote.stop()
        await host.close()
        await engine.stop()
