"""The HTTP API in-process on the fake backend: shapes, order, encodings, and error envelopes."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.engine.engine import EmbeddingEngine

from .conftest import engine_options, fake_app_over, in_process_client

pytestmark = pytest.mark.asyncio


def vectors_of(body: dict) -> np.ndarray:
    rows = sorted(body["data"], key=lambda item: item["index"])
    return np.array([row["embedding"] for row in rows], dtype=np.float32)


def assert_envelope(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body  # never FastAPI's {"detail": ...}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


async def test_single_string_has_openai_shape(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/embeddings", json={"input": "Hello, world!"})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert body["model"] == "fake-model"
    assert len(body["data"]) == 1
    item = body["data"][0]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == 64
    assert np.isclose(np.linalg.norm(item["embedding"]), 1.0, atol=1e-5)
    # "Hello," "world!" -> 2 word tokens + the end token the fake tokenizer appends
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


async def test_batch_keeps_order_and_matches_single_requests(client: httpx.AsyncClient) -> None:
    texts = [f"text number {i} " + "word " * (i % 7) for i in range(20)]
    batch = vectors_of((await client.post("/v1/embeddings", json={"input": texts})).json())
    for i in (0, 7, 19):
        single = vectors_of((await client.post("/v1/embeddings", json={"input": texts[i]})).json())
        np.testing.assert_allclose(batch[i], single[0], rtol=0, atol=1e-7)
    assert len({row.tobytes() for row in batch}) == len(texts)


async def test_short_route_is_identical(client: httpx.AsyncClient) -> None:
    payload = {"input": ["same text"], "model": "anything-at-all"}
    long_route = (await client.post("/v1/embeddings", json=payload)).json()
    short_route = (await client.post("/embeddings", json=payload)).json()
    assert long_route == short_route
    assert long_route["model"] == "fake-model"  # `model` is accepted, not used to select anything


async def test_instruction_changes_the_input_and_the_token_count(client: httpx.AsyncClient) -> None:
    plain = (await client.post("/v1/embeddings", json={"input": "what is a cat"})).json()
    instructed = (await client.post("/v1/embeddings", json={
        "input": "what is a cat", "instruction": "Given a question, find answers"})).json()
    assert instructed["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    assert vectors_of(plain).tobytes() != vectors_of(instructed).tobytes()


async def test_info_health_and_models(client: httpx.AsyncClient) -> None:
    info = (await client.get("/")).json()
    assert info["model"] == "fake-model" and "/v1/embeddings" in info["endpoints"]
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json() | {} == {
        "status": "healthy", "model": "fake-model", "gpu_memory_utilization": 0.4, "max_model_len": 64,
        "device": "cpu", "engine": "fake", "dtype": "float32", "dimension": 64}
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["fake-model"]
    assert models["data"][0]["object"] == "model"


async def test_loading_engine_answers_503() -> None:
    engine = EmbeddingEngine(FakeBackend(), engine_options())  # never started: still "loading"
    app = fake_app_over(engine)
    async with in_process_client(app) as http:
        health = await http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        error = assert_envelope(await http.post("/v1/embeddings", json={"input": "x"}), 503)
        assert "loading" in error["message"]


async def test_backend_failure_is_a_clean_500_and_the_server_recovers() -> None:
    backend = FakeBackend(fail_batches=[0])
    engine = EmbeddingEngine(backend, engine_options(batch_timeout_ms=0))
    await engine.start()
    app = fake_app_over(engine)
    try:
        async with in_process_client(app) as http:
            error = assert_envelope(await http.post("/v1/embeddings", json={"input": "boom"}), 500)
            assert "fake backend failure" not in error["message"]  # internals stay in the log
            assert (await http.post("/v1/embeddings", json={"input": "fine"})).status_code == 200
    finally:
        await engine.stop()
