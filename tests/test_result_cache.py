"""The exact result cache (docs/cache.md), in-process over the fake engine: hits are the first answer byte
for byte and never reach the backend, partial hits send only the misses, the memory bound holds (LRU by
bytes), 0 turns it off, prompts / instructions / truncation never share an entry, metrics and the header."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import numpy as np
import pytest

from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.engine.cached import through_cache
from embedding_service.engine.engine import EmbeddingEngine
from embedding_service.engine.options import ResultCacheOptions
from embedding_service.engine.result_cache import DIGEST_BYTES, ENTRY_OVERHEAD, ResultCache
from embedding_service.engine.types import EmbedRequest
from embedding_service.service import build_engines, open_result_cache, plan_service
from tests.conftest import engine_options, fake_app, make_settings

DIM = 64
ENTRY = DIGEST_BYTES + DIM * 4 + ENTRY_OVERHEAD  # one fake-engine entry's accounted size


async def _engine(cache: ResultCache | None, **options: object) -> EmbeddingEngine:
    engine = EmbeddingEngine(FakeBackend(dimension=DIM, max_model_len=64),
                             engine_options(**{"max_model_len": 64, "batch_timeout_ms": 1, **options}),
                             cache.for_model("fake") if cache is not None else None)
    await engine.start()
    return engine


@pytest.fixture
async def pair() -> AsyncIterator[tuple[EmbeddingEngine, EmbeddingEngine]]:
    """A cached engine and an uncached one over the same fake model."""
    cached, plain = await _engine(ResultCache(1 << 20)), await _engine(None)
    yield cached, plain
    await cached.stop()
    await plain.stop()


def _raw(body: dict) -> list[bytes]:
    return [base64.b64decode(item["embedding"]) for item in body["data"]]


def _sent(engine: EmbeddingEngine) -> list[int]:
    backend = engine.backend
    assert isinstance(backend, FakeBackend)
    return [n for lengths in backend.seen_lengths for n in [len(lengths)]]


async def test_a_hit_is_the_first_answer_byte_for_byte_without_a_forward(pair) -> None:
    cached, plain = pair
    body = {"input": ["the same text", "another one"], "encoding_format": "base64"}
    async with fake_app(engine=cached) as app, fake_app(engine=plain) as reference:
        first = await app.http.post("/v1/embeddings", json=body)
        again = await app.http.post("/v1/embeddings", json=body)
        uncached = await reference.http.post("/v1/embeddings", json=body)
    assert first.headers["x-embedding-cache"] == "miss" and again.headers["x-embedding-cache"] == "hit"
    assert "x-embedding-cache" not in uncached.headers  # no cache, no header
    assert _raw(again.json()) == _raw(first.json()) == _raw(uncached.json())
    assert _sent(cached) == [2]  # the hit never reached the backend
    assert again.json()["usage"]["prompt_tokens"] == first.json()["usage"]["prompt_tokens"] > 0
    assert float(again.headers["x-inference-time-ms"]) == 0.0


async def test_a_partial_hit_computes_only_the_misses_each_once(pair) -> None:
    cached, plain = pair
    await cached.embed(EmbedRequest(texts=["alpha", "beta"]))
    texts = ["alpha", "gamma", "beta", "gamma", "delta"]
    async with fake_app(engine=cached) as app:
        response = await app.http.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"})
    assert response.headers["x-embedding-cache"] == "partial"
    assert _sent(cached) == [2, 2]  # gamma (sent twice) and delta, once each
    reference = await plain.embed(EmbedRequest(texts=texts))
    assert _raw(response.json()) == [row.tobytes() for row in reference.vectors]
    assert cached.result_cache is not None
    stats = cached.result_cache.stats
    assert (stats.hits, stats.misses) == (2, 2 + 3)


async def test_dimensions_and_typed_outputs_are_cut_from_the_one_cached_vector(pair) -> None:
    cached, plain = pair
    await cached.embed(EmbedRequest(texts=["matryoshka text"]))
    short = await cached.embed(EmbedRequest(texts=["matryoshka text"], dimensions=32))
    assert short.cache_state == "hit"
    assert short.vectors.tobytes() == (await plain.embed(EmbedRequest(texts=["matryoshka text"], dimensions=32))
                                       ).vectors.tobytes()
    async with fake_app(engine=cached) as app, fake_app(engine=plain) as reference:
        body = {"texts": ["matryoshka text"], "input_type": "search_document", "embedding_types": ["int8", "float"]}
        typed = await app.http.post("/v2/embed", json=body)
        expected = await reference.http.post("/v2/embed", json=body)
    assert typed.headers["x-embedding-cache"] == "hit"
    assert typed.json()["embeddings"] == expected.json()["embeddings"]


async def test_prompts_instructions_and_truncation_never_share_an_entry(pair) -> None:
    cached, plain = pair
    text = " ".join(f"w{i}" for i in range(20))
    variants = [EmbedRequest(texts=[text]), EmbedRequest(texts=[text], instruction="find the answer"),
                EmbedRequest(texts=[text], instruction="find the question"),
                EmbedRequest(texts=[text], truncate=True, max_tokens=8),
                EmbedRequest(texts=[text], truncate=True, max_tokens=8, truncate_start=True),
                EmbedRequest(texts=[text], truncate=True, max_tokens=9)]
    rows = []
    for variant in variants:
        result = await cached.embed(variant)
        assert result.cache_state == "miss"
        assert result.vectors.tobytes() == (await plain.embed(variant)).vectors.tobytes()
        rows.append(result.vectors.tobytes())
    assert len(set(rows)) == len(variants)
    for variant in variants:  # and each one is its own hit afterwards
        assert (await cached.embed(variant)).cache_state == "hit"


async def test_the_key_is_the_token_ids_the_model_sees() -> None:
    """Text and the same token ids are one entry: the model cannot tell them apart."""
    engine = await _engine(ResultCache(1 << 20))
    try:
        ids = engine.backend.tokenize(["some words here"])[0]
        await engine.embed(EmbedRequest(texts=["some words here"]))
        assert (await engine.embed(EmbedRequest(token_ids=[ids[:-1]]))).cache_state == "hit"  # (eos added)
    finally:
        await engine.stop()


def test_memory_is_bounded_in_bytes_least_recently_used_first() -> None:
    cache = ResultCache(3 * ENTRY)
    one, other = cache.for_model("one"), cache.for_model("other")
    for model in (one, other):
        model._namespace = model.fingerprint.encode().ljust(16, b"-")  # as bind() would
    value = np.ones(DIM, np.float32).tobytes()
    keys = [bytes([i]) * DIGEST_BYTES for i in range(5)]
    for key in keys[:3]:
        cache.put(key, value, one.stats)
    assert cache.get(keys[0]) == value  # now the most recent: keys[1] is the oldest
    cache.put(keys[3], value, other.stats)
    assert cache.get(keys[1]) is None and cache.get(keys[0]) == value and cache.get(keys[3]) == value
    assert cache.bytes == 3 * ENTRY <= cache.max_bytes
    assert (one.stats.entries, one.stats.evictions, one.stats.bytes) == (2, 1, 2 * ENTRY)
    assert (other.stats.entries, other.stats.bytes) == (1, ENTRY)
    cache.put(keys[0], b"\0" * len(value), one.stats)  # already there: the first answer stays
    assert cache.get(keys[0]) == value
    cache.put(keys[4], value * 8, one.stats)  # larger than the whole bound: not kept, nothing evicted
    assert cache.get(keys[4]) is None and cache.bytes == 3 * ENTRY


async def test_eviction_under_traffic_keeps_the_bound_and_answers_exactly(pair) -> None:
    _, plain = pair
    cache = ResultCache(10 * ENTRY)
    engine = await _engine(cache)
    try:
        for round_ in range(3):
            texts = [f"text number {i}" for i in range(25)]
            result = await engine.embed(EmbedRequest(texts=texts))
            assert result.vectors.tobytes() == (await plain.embed(EmbedRequest(texts=texts))).vectors.tobytes()
            assert cache.bytes <= cache.max_bytes, round_
        assert engine.result_cache is not None
        stats = engine.result_cache.stats
        assert stats.entries == 10 and stats.hits > 0  # (each round finds the last round's ten most recent)
        assert stats.evictions == stats.misses - stats.entries > 0  # every stored entry but those held
    finally:
        await engine.stop()


async def test_on_by_default_and_zero_turns_it_off() -> None:
    assert open_result_cache(ResultCacheOptions.from_config(make_settings())) is not None
    assert make_settings().result_cache_bytes > 0
    assert open_result_cache(ResultCacheOptions.from_config(make_settings(result_cache_bytes=0))) is None
    plan = plan_service(make_settings(engine="fake", result_cache_bytes=0))
    assert all(getattr(engine, "result_cache", None) is None for engine in build_engines(plan).values())
    plan = plan_service(make_settings(engine="fake"))
    assert all(getattr(engine, "result_cache", None) is not None for engine in build_engines(plan).values())


async def test_models_and_numerics_never_share_an_entry() -> None:
    """One process cache under two settings of the same model (fp32, bf16): each computes its own."""
    cache = ResultCache(1 << 20)
    from embedding_service.service import build_embedding_engine

    engines = [build_embedding_engine(plan_service(make_settings(engine="fake", dtype=dtype)).embed, cache)
               for dtype in ("float32", "bfloat16")]
    for engine in engines:
        await engine.start()
    try:
        for engine in engines:
            assert (await engine.embed(EmbedRequest(texts=["shared text"]))).cache_state == "miss"
            assert (await engine.embed(EmbedRequest(texts=["shared text"]))).cache_state == "hit"
    finally:
        for engine in engines:
            await engine.stop()


@pytest.mark.parametrize("per_key", [False, True])
async def test_api_keys_share_entries_unless_per_key(per_key: bool) -> None:
    engine = await _engine(ResultCache(1 << 20, per_key=per_key))
    body = {"input": ["a text two clients send"]}
    try:
        async with fake_app(engine=engine, api_keys=["first-key-123", "second-key-456"]) as app:
            states = []
            for key in ("first-key-123", "first-key-123", "second-key-456"):
                answer = await app.http.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"})
                states.append(answer.headers["x-embedding-cache"])
    finally:
        await engine.stop()
    assert states == ["miss", "hit", "miss" if per_key else "hit"]


async def test_metrics_count_hits_misses_evictions_and_bytes() -> None:
    engine = await _engine(ResultCache(2 * ENTRY))
    try:
        async with fake_app(engine=engine) as app:
            await app.http.post("/v1/embeddings", json={"input": ["a", "b", "c"]})
            await app.http.post("/v1/embeddings", json={"input": ["c"]})
            text = (await app.http.get("/metrics")).text
    finally:
        await engine.stop()
    for line in ('embedding_result_cache_hits_total{model="fake-model"} 1.0',
                 'embedding_result_cache_misses_total{model="fake-model"} 3.0',
                 'embedding_result_cache_evictions_total{model="fake-model"} 1.0',
                 f'embedding_result_cache_bytes{{model="fake-model"}} {2 * ENTRY}.0',
                 'embedding_result_cache_entries{model="fake-model"} 2.0'):
        assert line in text, line
    assert "redis_errors" not in text  # no store, no series


async def test_a_request_answered_whole_skips_the_batcher() -> None:
    """through_cache never calls submit when every input is a hit (so the queue and its limits never see it)."""
    cache = ResultCache(1 << 20).for_model("m")
    cache._namespace = b"n" * 16
    calls: list[int] = []

    async def submit(seqs):  # type: ignore[no-untyped-def]
        calls.append(len(seqs))
        return np.eye(len(seqs), 4, dtype=np.float32), 0.1, 0.2

    first = await through_cache(cache, [[1, 2], [3]], submit)
    second = await through_cache(cache, [[3], [1, 2]], submit)
    assert calls == [2] and second[3] == 2 and second[1:3] == (0.0, 0.0)
    assert second[0].tobytes() == first[0][::-1].tobytes()
    second[0][0, 0] = 5.0  # the rows handed out are the caller's to change; the cache keeps its bytes
    assert (await through_cache(cache, [[3]], submit))[0].tobytes() == first[0][1:].tobytes()


@pytest.mark.slow
async def test_minilm_on_torch_fp32_a_hit_is_the_computed_vector_and_the_reference(minilm_dir) -> None:
    """The real model: the cached answer is the first answer's bytes, an uncached engine's bytes for the same
    request, and within fp32 rounding of sentence-transformers; a partial hit's new row is its own vector."""
    st = pytest.importorskip("sentence_transformers")
    from embedding_service.backends.torch.embed import TorchBackend
    from tests.conftest import backend_options

    texts = ["A man is eating food.", "A man is riding a horse.", "The new movie is awesome"]
    engines = [EmbeddingEngine(TorchBackend(backend_options(minilm_dir, device="cpu", dtype="float32")),
                               engine_options(max_model_len=256), cache)
               for cache in (ResultCache(1 << 20).for_model("minilm"), None)]
    for engine in engines:
        await engine.start()
    try:
        cached, plain = engines
        first = await cached.embed(EmbedRequest(texts=texts))
        again = await cached.embed(EmbedRequest(texts=texts))
        uncached = await plain.embed(EmbedRequest(texts=texts))
        assert (first.cache_state, again.cache_state) == ("miss", "hit")
        assert again.vectors.tobytes() == first.vectors.tobytes() == uncached.vectors.tobytes()
        reference = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, normalize_embeddings=True)
        assert float(np.min(np.sum(again.vectors * reference, axis=1))) >= 0.9999
        mixed = await cached.embed(EmbedRequest(texts=[texts[0], "A woman is playing violin."]))
        assert mixed.cache_state == "partial" and mixed.vectors[0].tobytes() == first.vectors[0].tobytes()
        alone = await plain.embed(EmbedRequest(texts=["A woman is playing violin."]))
        assert mixed.vectors[1].tobytes() == alone.vectors[0].tobytes()  # computed alone, as the miss was
    finally:
        for engine in engines:
            await engine.stop()


def test_engine_library_versions_are_part_of_the_key() -> None:
    """A cache shared through Redis must not answer an upgraded runtime with its predecessor's vectors: the
    versions an engine's numbers depend on (and the openvino export's format) go into the fingerprint."""
    from importlib import metadata

    from embedding_service.backends import numerics_versions
    from embedding_service.backends.openvino.embed import EXPORT_VERSION

    assert numerics_versions("torch")["torch"] == metadata.version("torch")
    assert numerics_versions("openvino")["openvino_export"] == EXPORT_VERSION
    assert numerics_versions("fake") == {}


async def test_a_request_with_a_chunked_input_bypasses_the_cache(pair) -> None:
    cached, plain = pair
    body = {"input": ["short", " ".join(f"w{i}" for i in range(150))], "long_inputs": "chunk",
            "encoding_format": "base64"}
    async with fake_app(engine=cached) as app, fake_app(engine=plain) as reference:
        first = await app.http.post("/v1/embeddings", json=body)
        again = await app.http.post("/v1/embeddings", json=body)
        uncached = await reference.http.post("/v1/embeddings", json=body)
    assert first.status_code == again.status_code == 200, first.text
    assert "x-embedding-cache" not in first.headers and "x-embedding-cache" not in again.headers
    assert first.headers["x-chunked-inputs"] == "1:3"
    assert _raw(again.json()) == _raw(first.json()) == _raw(uncached.json())
