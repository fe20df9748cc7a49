"""The HTTP API in-process on the fake backend: shapes, order, encodings, and error envelopes."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from embedding_service.api.app import create_app
from embedding_service.backends.fake import FakeBackend
from embedding_service.engine.engine import EmbeddingEngine

from .conftest import engine_options, make_settings

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


async def test_base64_decodes_to_the_float_vectors(client: httpx.AsyncClient) -> None:
    texts = ["alpha beta", "gamma"]
    floats = vectors_of((await client.post("/v1/embeddings", json={"input": texts})).json())
    body = (await client.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"})).json()
    decoded = np.array([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in body["data"]])
    np.testing.assert_array_equal(decoded, floats)


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


@pytest.mark.parametrize(
    ("payload", "param", "fragment"),
    [
        ({}, "input", "required"),
        ({"input": ""}, "input", "empty"),
        ({"input": []}, "input", "empty"),
        ({"input": 42}, "input", "must be"),
        ({"input": ["ok", 3]}, "input", "input[1]"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
        ({"input": "x", "dimensions": "8"}, "dimensions", None),
        ({"input": "x", "instruction": 5}, "instruction", None),
    ],
)
async def test_bad_requests_get_400_envelopes(client: httpx.AsyncClient, payload: dict, param: str,
                                              fragment: str | None) -> None:
    error = assert_envelope(await client.post("/v1/embeddings", json=payload), 400, param)
    if fragment:
        assert fragment in error["message"]
    assert (await client.post("/v1/embeddings", json={"input": "still serving"})).status_code == 200


async def test_malformed_json_and_wrong_content_type(client: httpx.AsyncClient) -> None:
    headers = {"content-type": "application/json"}
    error = assert_envelope(await client.post("/v1/embeddings", content=b'{"input": [', headers=headers), 400)
    assert "JSON" in error["message"]
    assert_envelope(await client.post("/v1/embeddings", content=b"input=x",
                                      headers={"content-type": "application/x-www-form-urlencoded"}), 415)


async def test_routing_errors_use_the_envelope(client: httpx.AsyncClient) -> None:
    assert_envelope(await client.get("/v1/nope"), 404)
    assert_envelope(await client.get("/v1/embeddings"), 405)


async def test_loading_engine_answers_503() -> None:
    engine = EmbeddingEngine(FakeBackend(), engine_options())  # never started: still "loading"
    app = create_app(make_settings(engine="fake"), engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        health = await http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        error = assert_envelope(await http.post("/v1/embeddings", json={"input": "x"}), 503)
        assert "loading" in error["message"]


async def test_backend_failure_is_a_clean_500_and_the_server_recovers() -> None:
    backend = FakeBackend(fail_batches=[0])
    engine = EmbeddingEngine(backend, engine_options(batch_timeout_ms=0))
    await engine.start()
    app = create_app(make_settings(engine="fake"), engine)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            error = assert_envelope(await http.post("/v1/embeddings", json={"input": "boom"}), 500)
            assert "fake backend failure" not in error["message"]  # internals stay in the log
            assert (await http.post("/v1/embeddings", json={"input": "fine"})).status_code == 200
    finally:
        await engine.stop()
