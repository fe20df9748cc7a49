"""Rerank and score over HTTP, in-process, on the fake engines: shapes, ordering, model selection, limits
and bad input (each a 400 in the OpenAI envelope), /v1/models, /health and metrics with two models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest

from embedding_service.api.app import create_app
from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.backends.fake.scoring import FakeScoringBackend
from embedding_service.engine.engine import EmbeddingEngine, EngineOptions
from embedding_service.engine.rerank import RerankEngine

from .conftest import engine_options, make_settings

EMBED, RERANK = "fake-embedder", "fake-reranker"
DOCS = ["the cat sat", "a dog ran far away", "cat cat cat", "nothing here"]
QUERY = "cat"


def _options(**overrides: Any) -> EngineOptions:
    return engine_options(**{"max_model_len": 32, "batch_timeout_ms": 1, **overrides})


async def _client(embed: bool = True, rerank: bool = True, max_documents: int = 1000,
                  **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    engine = EmbeddingEngine(FakeBackend(dimension=16, max_model_len=32, model=EMBED), _options()) if embed else None
    reranker = RerankEngine(FakeScoringBackend(model=RERANK, max_model_len=32), _options(),
                            max_documents=max_documents) if rerank else None
    config = make_settings(engine="fake", served_model_name=EMBED, rerank_model=RERANK if rerank else None,
                           rerank_only=not embed, **settings)
    app = create_app(config, engine, reranker=reranker)
    for each in (engine, reranker):
        if each is not None:
            await each.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            yield http
    finally:
        for each in (engine, reranker):
            if each is not None:
                await each.stop()


@pytest.fixture
async def both() -> AsyncIterator[httpx.AsyncClient]:
    async for http in _client():
        yield http


def _expected(query: str, docs: list[str]) -> np.ndarray:
    words = set(query.split())
    return np.array([sum(w in words for w in d.split()) / len(d.split()) for d in docs], dtype=np.float32)


def _error(response: httpx.Response, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
async def test_rerank_sorts_by_score(both: httpx.AsyncClient, path: str) -> None:
    response = await both.post(path, json={"query": QUERY, "documents": DOCS, "model": "rerank-v3.5"})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = _expected(QUERY, DOCS)
    assert [r["index"] for r in body["results"]] == sorted(range(4), key=lambda i: (-expected[i], i))
    for result in body["results"]:
        assert result["relevance_score"] == pytest.approx(float(expected[result["index"]]), abs=1e-6)
        assert "document" not in result
    assert body["model"] == RERANK and body["id"].startswith("rerank-")
    tokens = sum(4 + len(d.split()) for d in DOCS)  # [CLS] query [SEP] doc [SEP]
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


async def test_top_n_return_documents_and_text_objects(both: httpx.AsyncClient) -> None:
    docs = [{"text": d} for d in DOCS]
    response = await both.post("/v1/rerank", json={"query": QUERY, "documents": docs, "top_n": 2,
                                                   "return_documents": True})
    results = response.json()["results"]
    assert [r["index"] for r in results] == [2, 0]
    assert [r["document"] for r in results] == [{"text": DOCS[2]}, {"text": DOCS[0]}]


async def test_instruction_reaches_the_model(both: httpx.AsyncClient) -> None:
    plain = await both.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
    instructed = await both.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "instruction": "find cats"})
    assert instructed.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"] + 2 * len(DOCS)


async def test_model_selects_by_name(both: httpx.AsyncClient) -> None:
    ok = await both.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "model": RERANK})
    assert ok.status_code == 200
    error = _error(await both.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "model": EMBED}),
                   "model")
    assert EMBED in error["message"] and "task: embed" in error["message"]
    assert error["code"] == "model_cannot_rerank"
    error = _error(await both.post("/v1/embeddings", json={"input": "x", "model": RERANK}), "model")
    assert "task: rerank" in error["message"]
    assert (await both.post("/v1/embeddings", json={"input": "x", "model": EMBED})).status_code == 200


async def test_embedding_only_server_refuses_to_rerank() -> None:
    async for http in _client(rerank=False):
        error = _error(await http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}), "model")
        assert f"model '{EMBED}' is an embedding model (task: embed)" in error["message"]


async def test_reranker_alone() -> None:
    async for http in _client(embed=False):
        assert (await http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})).status_code == 200
        error = _error(await http.post("/v1/embeddings", json={"input": "x"}), "model")
        assert "task: rerank" in error["message"]
        health = (await http.get("/health")).json()
        assert health["status"] == "healthy" and health["model"] == RERANK
        models = (await http.get("/v1/models")).json()["data"]
        assert [(m["id"], m["task"]) for m in models] == [(RERANK, "rerank")]


async def test_models_and_health_list_both(both: httpx.AsyncClient) -> None:
    models = (await both.get("/v1/models")).json()["data"]
    assert [(m["id"], m["task"]) for m in models] == [(EMBED, "embed"), (RERANK, "rerank")]
    assert (await both.get(f"/v1/models/{RERANK}")).json()["task"] == "rerank"
    health = (await both.get("/health")).json()
    assert health["status"] == "healthy" and health["model"] == EMBED
    assert [(m["model"], m["task"], m["status"]) for m in health["models"]] == [
        (EMBED, "embed", "healthy"), (RERANK, "rerank", "healthy")]


async def test_score_one_to_one_one_to_many_and_pairs(both: httpx.AsyncClient) -> None:
    one = await both.post("/v1/score", json={"text_1": QUERY, "text_2": DOCS[0]})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["object"] == "list" and body["model"] == RERANK
    expected = float(_expected(QUERY, DOCS[:1])[0])
    assert body["data"] == [{"index": 0, "object": "score", "score": pytest.approx(expected)}]
    many = (await both.post("/v1/score", json={"text_1": QUERY, "text_2": DOCS})).json()
    np.testing.assert_allclose([d["score"] for d in many["data"]], _expected(QUERY, DOCS), atol=1e-6)
    pairs = (await both.post("/v1/score", json={"text_1": ["dog", "cat"], "text_2": DOCS[1:3]})).json()
    np.testing.assert_allclose([d["score"] for d in pairs["data"]],
                               [_expected("dog", DOCS[1:2])[0], _expected("cat", DOCS[2:3])[0]], atol=1e-6)
    _error(await both.post("/v1/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}), "text_2")


async def test_score_with_an_embedding_model_is_the_cosine(both: httpx.AsyncClient) -> None:
    response = await both.post("/v1/score", json={"text_1": QUERY, "text_2": DOCS[:2], "model": EMBED})
    assert response.status_code == 200, response.text
    vectors = (await both.post("/v1/embeddings", json={"input": [QUERY, *DOCS[:2]]})).json()["data"]
    v = np.array([d["embedding"] for d in vectors])
    np.testing.assert_allclose([d["score"] for d in response.json()["data"]], v[1:] @ v[0], atol=1e-5)


BAD: list[tuple[str, dict[str, Any], str | None, str]] = [
    ("no documents", {"query": "q"}, "documents", "required"),
    ("empty documents", {"query": "q", "documents": []}, "documents", "empty list"),
    ("documents a string", {"query": "q", "documents": "abc"}, "documents", "must be a list"),
    ("document a number", {"query": "q", "documents": ["a", 3]}, "documents", "documents[1]"),
    ("document object without text", {"query": "q", "documents": [{"txt": "a"}]}, "documents", "without 'text'"),
    ("empty document", {"query": "q", "documents": ["a", " "]}, "documents", "documents[1]"),
    ("no query", {"documents": ["a"]}, "query", "required"),
    ("empty query", {"query": "", "documents": ["a"]}, "query", "empty"),
    ("query a list", {"query": ["q"], "documents": ["a"]}, "query", "must be a string"),
    ("top_n zero", {"query": "q", "documents": ["a"], "top_n": 0}, "top_n", "between 1 and"),
    ("top_n too big", {"query": "q", "documents": ["a", "b"], "top_n": 3}, "top_n", "between 1 and the number"),
    ("top_n a string", {"query": "q", "documents": ["a"], "top_n": "1"}, "top_n", "integer"),
    ("top_n a bool", {"query": "q", "documents": ["a"], "top_n": True}, "top_n", "integer"),
    ("return_documents a string", {"query": "q", "documents": ["a"], "return_documents": "yes"},
     "return_documents", "boolean"),
    ("empty instruction", {"query": "q", "documents": ["a"], "instruction": ""}, "instruction", "empty"),
    ("NUL in a document", {"query": "q", "documents": ["a\x00b"]}, "documents", "NUL"),
    ("over-long pair", {"query": "q", "documents": ["w " * 40]}, "documents", "limit of 32"),
    ("query too long to truncate", {"query": "q " * 40, "documents": ["a"], "truncate": True}, "query",
     "no room"),
    ("body a list", [], None, "JSON object"),  # type: ignore[list-item]
]


@pytest.mark.parametrize(("body", "param", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
async def test_bad_rerank_requests(both: httpx.AsyncClient, body: dict[str, Any], param: str | None,
                                   words: str) -> None:
    error = _error(await both.post("/v1/rerank", json=body), param)
    assert words in error["message"], error


async def test_over_long_pair_code_and_truncation(both: httpx.AsyncClient) -> None:
    long_doc = "cat " + "w " * 40
    error = _error(await both.post("/v1/rerank", json={"query": QUERY, "documents": ["a", long_doc]}))
    assert error["code"] == "context_length_exceeded" and "documents[1]" in error["message"]
    cut = await both.post("/v1/rerank", json={"query": QUERY, "documents": ["a", long_doc], "truncate": True})
    assert cut.status_code == 200, cut.text
    assert cut.json()["usage"]["prompt_tokens"] == 5 + 32  # "a" pair, and the long pair cut to the limit


async def test_max_tokens_per_doc_cuts_each_document_as_cohere_does(both: httpx.AsyncClient) -> None:
    docs = ["dog dog cat cat", "cat dog"]  # 4 and 2 tokens on the fake tokenizer
    whole = (await both.post("/v1/rerank", json={"query": QUERY, "documents": docs})).json()
    cut = await both.post("/v2/rerank", json={"query": QUERY, "documents": docs, "max_tokens_per_doc": 2})
    assert cut.status_code == 200, cut.text
    scores = {r["index"]: r["relevance_score"] for r in cut.json()["results"]}
    assert scores == pytest.approx({0: 0.0, 1: 0.5})  # "dog dog" scored, not the whole first document
    assert cut.json()["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"] - 2
    _error(await both.post("/v1/rerank", json={"query": QUERY, "documents": docs, "max_tokens_per_doc": 0}),
           "max_tokens_per_doc")
    _error(await both.post("/v1/rerank", json={"query": QUERY, "documents": docs, "max_tokens_per_doc": "2"}),
           "max_tokens_per_doc")


async def test_too_many_documents_is_configurable() -> None:
    async for http in _client(max_documents=3):
        error = _error(await http.post("/v1/rerank", json={"query": "q", "documents": ["a"] * 4}), "documents")
        assert "too many documents: 4; at most 3" in error["message"]
        assert (await http.post("/v1/rerank", json={"query": "q", "documents": ["a"] * 3})).status_code == 200


async def test_bad_score_requests(both: httpx.AsyncClient) -> None:
    _error(await both.post("/v1/score", json={"text_2": "a"}), "text_1")
    _error(await both.post("/v1/score", json={"text_1": "a", "text_2": []}), "text_2")
    _error(await both.post("/v1/score", json={"text_1": "a", "text_2": [1]}), "text_2")
    _error(await both.post("/v1/score", json={"text_1": "q", "text_2": "w " * 40}), "text_2")


async def test_rate_limit_counts_the_tokens_of_all_pairs() -> None:
    async for http in _client(rate_limit_tpm=30):
        first = await http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})  # 29 tokens
        assert first.status_code == 200
        second = await http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
        assert second.status_code == 429, second.text


async def test_metrics_count_pairs(both: httpx.AsyncClient) -> None:
    await both.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
    text = (await both.get("/metrics")).text
    assert f'embedding_rerank_pairs_total{{model="{RERANK}"}} 4.0' in text
    assert f'embedding_rerank_engine_state{{model="{RERANK}",state="healthy"}} 1.0' in text
    assert "embedding_rerank_model_info{" in text and f'model="{RERANK}"' in text
    assert f'embedding_texts_total{{model="{EMBED}"}} 0.0' in text  # the embedding model's own series


async def test_a_reranker_served_alone_reports_rerank_metrics_only() -> None:
    async for http in _client(embed=False):
        await http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
        text = (await http.get("/metrics")).text
        assert f'embedding_rerank_pairs_total{{model="{RERANK}"}} 4.0' in text
        assert f'embedding_rerank_engine_state{{model="{RERANK}",state="healthy"}} 1.0' in text
        # No embedding model: none of its series.
        assert "embedding_texts_total" not in text and "embedding_engine_state" not in text
        assert "embedding_model_info" not in text


async def test_request_id_is_echoed(both: httpx.AsyncClient) -> None:
    response = await both.post("/v1/rerank", json={"query": QUERY, "documents": DOCS},
                               headers={"X-Request-Id": "rr-1"})
    assert response.headers["x-request-id"] == "rr-1"
