"""The result cache for sparse models and rerankers (docs/cache.md), in-process over fake engines: a hit is
the first answer byte for byte, an uncached engine's answer, and never reaches the backend; top_k is cut after
the cache; a pair's token-type split is in its key; metrics per model; the header on every route."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embedding_service.api.served import RERANK, SPARSE
from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.backends.fake.scoring import FakeScoringBackend
from embedding_service.backends.model.pair_tokenizer import TokenPair
from embedding_service.backends.sparse import DOCUMENT, SparseVector, pack_rows
from embedding_service.engine.rerank import RerankEngine, ScoreRequest
from embedding_service.engine.result_cache import ResultCache
from embedding_service.engine.sparse import SparseEngine
from embedding_service.engine.types import EmbedRequest

from .conftest import beside_a_fake_dense, engine_options

TEXTS = ["sparse retrieval with learned weights", "a second text", "and a third one, longer than the others"]


class FakeSparse(FakeBackend):
    """A sparse model of the fake tokenizer: each distinct id of a text, weighted by the fake dense vector."""

    has_query_encoder = False
    default_route = DOCUMENT

    def query_vectors(self, batch: Sequence[Sequence[int]]) -> list[SparseVector]:
        raise AssertionError("not inference-free")

    def tokens_of(self, indices: np.ndarray) -> list[str]:
        return [f"t{i}" for i in indices.tolist()]

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        dense = super().embed(batch)
        vectors = []
        for row, ids in zip(dense, batch, strict=True):
            indices = np.unique(np.asarray(ids, dtype=np.int32))
            vectors.append(SparseVector(indices, (np.abs(row[indices % len(row)]) + 0.01).astype(np.float32)))
        return pack_rows(vectors)


async def _sparse(cached: bool) -> SparseEngine:
    engine = SparseEngine(FakeSparse(dimension=64, max_model_len=64), engine_options(max_model_len=64,
                          batch_timeout_ms=1), ResultCache(1 << 20).for_model("sparse") if cached else None)
    await engine.start()
    return engine


def _bytes(vectors: list[SparseVector]) -> list[tuple[bytes, bytes]]:
    return [(v.indices.tobytes(), v.values.tobytes()) for v in vectors]


async def test_sparse_hits_are_the_first_answer_and_the_uncached_engines_top_k_cut_after() -> None:
    cached, plain = await _sparse(True), await _sparse(False)
    backend = cached.backend
    assert isinstance(backend, FakeSparse)
    try:
        first = await cached.encode(EmbedRequest(texts=TEXTS))
        again = await cached.encode(EmbedRequest(texts=TEXTS[::-1]))
        pruned = await cached.encode(EmbedRequest(texts=TEXTS), top_k=3)
        assert backend.batches == [3]  # the two repeats never reached the backend
        assert (first.cache_state, again.cache_state, pruned.cache_state) == ("miss", "hit", "hit")
        reference = await plain.encode(EmbedRequest(texts=TEXTS))
        assert reference.cache_state is None
        for vector in again.vectors:
            assert vector.indices.dtype == np.int32 and vector.values.dtype == np.float32
        assert _bytes(first.vectors) == _bytes(again.vectors[::-1]) == _bytes(reference.vectors)
        assert _bytes(pruned.vectors) == _bytes((await plain.encode(EmbedRequest(texts=TEXTS), top_k=3)).vectors)
        assert all(len(v.indices) == 3 for v in pruned.vectors)
        partial = await cached.encode(EmbedRequest(texts=[TEXTS[0], "something new"]))
        assert partial.cache_state == "partial" and backend.batches == [3, 1]
    finally:
        await cached.stop()
        await plain.stop()


async def test_sparse_routes_carry_the_header_and_metrics_count_per_model() -> None:
    async with beside_a_fake_dense("splade", await _sparse(True), SPARSE) as http:
        tei = [await http.post("/embed_sparse", json={"inputs": TEXTS}) for _ in range(2)]
        openai = await http.post("/v1/embeddings", json={"model": "splade", "input": TEXTS[:1]})
        metrics = (await http.get("/metrics")).text
    assert [r.headers["x-embedding-cache"] for r in tei] == ["miss", "hit"]
    assert tei[0].json() == tei[1].json()
    assert openai.status_code == 200 and openai.headers["x-embedding-cache"] == "hit"
    assert 'embedding_result_cache_hits_total{model="splade"} 4.0' in metrics
    assert 'embedding_result_cache_misses_total{model="splade"} 3.0' in metrics


class SplitScoring(FakeScoringBackend):
    """The fake reranker, whose token-type split can move by one with the same ids (`shift`)."""

    shift = 0

    def encode_pairs(self, queries: Sequence[str], documents: Sequence[str],
                     instruction: str | None = None) -> list[TokenPair]:
        pairs = super().encode_pairs(queries, documents, instruction)
        return [TokenPair(p, head=p.head, tail=p.tail, second_start=(p.second_start or 0) + self.shift)
                for p in pairs]


async def _reranker(cached: bool) -> RerankEngine:
    engine = RerankEngine(SplitScoring(max_model_len=64), engine_options(max_model_len=64, batch_timeout_ms=1),
                          max_documents=100, result_cache=ResultCache(1 << 20).for_model("rr") if cached else None)
    await engine.start()
    return engine


async def test_rerank_hits_are_exact_and_the_token_type_split_is_in_the_key() -> None:
    cached, plain = await _reranker(True), await _reranker(False)
    backend = cached.backend
    assert isinstance(backend, SplitScoring)

    def request() -> ScoreRequest:
        return ScoreRequest(queries=["cat dog"] * 3, documents=["the cat sat", "a dog ran", "cat and dog"])

    try:
        first = await cached.score(request())
        again = await cached.score(request())
        assert (first.cache_state, again.cache_state, backend.batches) == ("miss", "hit", [3])
        reference = await plain.score(request())
        assert again.scores.tobytes() == first.scores.tobytes() == reference.scores.tobytes()
        assert again.prompt_tokens == first.prompt_tokens
        for engine in (cached, plain):
            assert isinstance(engine.backend, SplitScoring)
            engine.backend.shift = 1  # the same ids, another split: another input to the model
        moved = await cached.score(request())
        assert moved.cache_state == "miss" and backend.batches == [3, 3]
        assert moved.scores.tobytes() == (await plain.score(request())).scores.tobytes()
        assert moved.scores.tobytes() != first.scores.tobytes()  # (the split changes this fake's scores)
    finally:
        await cached.stop()
        await plain.stop()


async def test_rerank_and_score_routes_carry_the_header_and_metrics_count_per_model() -> None:
    documents = ["the cat sat", "a dog ran far", "cat and dog"]
    async with beside_a_fake_dense("rr", await _reranker(True), RERANK) as http:
        v1 = [await http.post("/v1/rerank", json={"query": "cat", "documents": documents}) for _ in range(2)]
        v2 = await http.post("/v2/rerank", json={"model": "rr", "query": "cat", "documents": documents[:2]})
        score = await http.post("/v1/score", json={"text_1": "cat", "text_2": [*documents[1:], "new one"]})
        metrics = (await http.get("/metrics")).text
    assert [r.headers["x-embedding-cache"] for r in v1] == ["miss", "hit"] and v1[0].json()["results"] == \
        v1[1].json()["results"]
    assert v2.headers["x-embedding-cache"] == "hit" and score.headers["x-embedding-cache"] == "partial"
    assert float(v1[1].headers["x-inference-time-ms"]) == 0.0
    assert 'embedding_result_cache_hits_total{model="rr"} 7.0' in metrics
    assert 'embedding_result_cache_misses_total{model="rr"} 4.0' in metrics
