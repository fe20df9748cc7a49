"""A real server process serving an embedding model and a reranker together (torch engine, fp32; openvino too), and real
clients nobody here wrote: the cohere SDK (ClientV2.rerank, POST /v2/rerank) and LangChain's CohereRerank.
Each equals raw HTTP; raw HTTP equals the Qwen3-Reranker model card's computation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from .conftest import ServerProcess
from .rerank_reference import CardQwen3Reranker

pytestmark = pytest.mark.slow

cohere = pytest.importorskip("cohere")

EMBEDDER, RERANKER = "tiny-qwen3", "tiny-reranker"
QUERY = "What is the capital of China?"
DOCS = ["Beijing is the capital of China.", "Gravity pulls apples down.", "China is a country in Asia.",
        "The capital of France is Paris.", "zouza kei lou " * 40]


@pytest.fixture(scope="module")
def server(tiny_qwen_dir: Path, tiny_reranker_dir: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(["--engine", "torch", "--dtype", "float32", "--model-path", str(tiny_qwen_dir),
                             "--served-model-name", EMBEDDER, "--rerank-model-path", str(tiny_reranker_dir),
                             "--served-rerank-model-name", RERANKER])
    try:
        process.wait_healthy(240)
        yield process
    finally:
        assert process.stop() == 0, process.log()  # drained and exited cleanly


def _raw(server: ServerProcess, **extra: object) -> dict[int, float]:
    response = httpx.post(server.url + "/v1/rerank", json={"query": QUERY, "documents": DOCS, **extra}, timeout=60)
    assert response.status_code == 200, response.text
    return {r["index"]: r["relevance_score"] for r in response.json()["results"]}


def test_served_scores_equal_the_model_card(server: ServerProcess, tiny_reranker_dir: Path) -> None:
    raw = _raw(server)
    expected = CardQwen3Reranker(tiny_reranker_dir).scores(QUERY, DOCS)
    got = [raw[i] for i in range(len(DOCS))]
    assert np.ptp(expected) > 0.01
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    health = httpx.get(server.url + "/health").json()
    assert [(m["model"], m["task"]) for m in health["models"]] == [(EMBEDDER, "embed"), (RERANKER, "rerank")]
    embedded = httpx.post(server.url + "/v1/embeddings", json={"input": "hello"})
    assert embedded.status_code == 200 and embedded.json()["model"] == EMBEDDER


def test_both_models_on_the_openvino_engine(tiny_qwen_dir: Path, tiny_reranker_dir: Path, tmp_path: Path) -> None:
    """`--engine openvino` serves the embedding model and the reranker on openvino, scores equal to the card."""
    pytest.importorskip("openvino")
    process = ServerProcess(["--engine", "openvino", "--dtype", "float32", "--model-path", str(tiny_qwen_dir),
                             "--served-model-name", EMBEDDER, "--rerank-model-path", str(tiny_reranker_dir),
                             "--served-rerank-model-name", RERANKER],
                            env={"EMBEDDING_OPENVINO_CACHE_DIR": str(tmp_path / "openvino")})
    try:
        process.wait_healthy(240)
        raw = _raw(process)
        expected = CardQwen3Reranker(tiny_reranker_dir).scores(QUERY, DOCS)
        np.testing.assert_allclose([raw[i] for i in range(len(DOCS))], expected, atol=1e-4, rtol=0)
        health = httpx.get(process.url + "/health").json()
        assert [(m["model"], m["engine"]) for m in health["models"]] == [(EMBEDDER, "openvino"),
                                                                         (RERANKER, "openvino")], health
        assert httpx.post(process.url + "/v1/embeddings", json={"input": "hello"}).status_code == 200
    finally:
        assert process.stop() == 0, process.log()


def test_cohere_sdk_v2_equals_raw_http(server: ServerProcess) -> None:
    raw = _raw(server)
    client = cohere.ClientV2(api_key="unused", base_url=server.url)
    response = client.rerank(model=RERANKER, query=QUERY, documents=DOCS, top_n=3)
    best = sorted(raw, key=lambda i: (-raw[i], i))[:3]
    assert [r.index for r in response.results] == best
    assert [r.relevance_score for r in response.results] == [raw[i] for i in best]


async def test_cohere_async_sdk_equals_raw_http(server: ServerProcess) -> None:
    raw = _raw(server)
    client = cohere.AsyncClientV2(api_key="unused", base_url=server.url)
    response = await client.rerank(model=RERANKER, query=QUERY, documents=DOCS)
    assert {r.index: r.relevance_score for r in response.results} == raw


def test_langchain_cohere_rerank_equals_raw_http(server: ServerProcess) -> None:
    pytest.importorskip("langchain_cohere")
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document

    raw = _raw(server)
    reranker = CohereRerank(client=cohere.ClientV2(api_key="unused", base_url=server.url), model=RERANKER, top_n=2)
    kept = reranker.compress_documents([Document(page_content=d) for d in DOCS], QUERY)
    best = sorted(raw, key=lambda i: (-raw[i], i))[:2]
    assert [d.page_content for d in kept] == [DOCS[i] for i in best]
    assert [d.metadata["relevance_score"] for d in kept] == [raw[i] for i in best]
