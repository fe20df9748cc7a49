"""Requests real clients send that must be accepted, and what a good answer must hold: usage counts, the
truncation end, base64 equal to float. In-process on the fake engine (real models: test_model_fidelity.py).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest

from embedding_service.backends.fake.embed import FakeBackend

from .conftest import make_settings
from .fidelity_support import DIM, MAX_LEN, fake_client, words


@pytest.fixture
async def fake_http() -> AsyncIterator[httpx.AsyncClient]:
    async with fake_client() as http:
        yield http


# --- ---------------------------------------------------
GOOD = [
    ("unknown fields", {"input": "a", "user": "u-1", "x_custom": {"k": [1]}}),
    ("any model name", {"input": "a", "model": "text-embedding-3-small"}),
    ("null options", {"input": "a", "dimensions": None, "encoding_format": None, "user": None}),
    ("base64", {"input": ["a", "b"], "encoding_format": "base64"}),
    ("token ids flat", {"input": [5, 6, 7]}),
    ("token id lists", {"input": [[5, 6], [7]]}),
    ("full dimensions", {"input": "a", "dimensions": DIM}),
    ("exactly 2048 inputs", {"input": ["a"] * 2048}),
    ("exactly the token limit", {"input": words(MAX_LEN - 1)}),
    ("per-request truncate", {"input": words(MAX_LEN + 20), "truncate": True}),
    ("whitespace text", {"input": " "}),
]


@pytest.mark.parametrize(("name", "payload"), GOOD, ids=[name for name, _ in GOOD])
async def test_accepted_request(fake_http: httpx.AsyncClient, name: str, payload: dict[str, Any]) -> None:
    response = await fake_http.post("/v1/embeddings", json=payload)
    assert response.status_code == 200, (name, response.text)
    body = response.json()
    assert body["object"] == "list" and body["model"] == "fake-model"
    count = (
        1
        if isinstance(payload["input"], str) or isinstance(payload["input"][0], int)
        else len(payload["input"])
    )
    assert [item["index"] for item in body["data"]] == list(range(count))
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


@pytest.mark.parametrize(
    "content_type", [None, "application/json; charset=utf-8", "application/vnd.api+json"]
)
async def test_accepted_content_types(fake_http: httpx.AsyncClient, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    request = fake_http.build_request("POST", "/v1/embeddings", content=b'{"input": "a"}', headers=headers)
    if content_type is None:
        request.headers.pop("content-type", None)
    response = await fake_http.send(request)
    assert response.status_code == 200, response.text


async def test_usage_counts_embedded_tokens(fake_http: httpx.AsyncClient) -> None:
    fake = FakeBackend()
    plain = await fake_http.post("/v1/embeddings", json={"input": ["a b c", "d"]})
    assert plain.json()["usage"]["prompt_tokens"] == 4 + 2  # words + end-of-text each
    instructed = await fake_http.post("/v1/embeddings", json={"input": "a b c", "instruction": "Find it"})
    expected = len(fake.tokenize(["Instruct: Find it\nQuery:a b c"])[0])
    assert instructed.json()["usage"]["prompt_tokens"] == expected
    ids = await fake_http.post("/v1/embeddings", json={"input": [5, 6, 7]})
    assert ids.json()["usage"]["prompt_tokens"] == 4  # the end-of-text id was added
    cut = await fake_http.post("/v1/embeddings", json={"input": words(MAX_LEN + 20), "truncate": True})
    assert cut.json()["usage"]["prompt_tokens"] == MAX_LEN


async def test_truncation_keeps_the_start_and_the_end_of_text(fake_http: httpx.AsyncClient) -> None:
    long_text = words(MAX_LEN + 20)
    kept = " ".join(long_text.split()[: MAX_LEN - 1])  # the first 63 words + end-of-text = 64 tokens
    cut = await fake_http.post("/v1/embeddings", json={"input": long_text, "truncate": True})
    exact = await fake_http.post("/v1/embeddings", json={"input": kept})
    assert cut.json()["data"][0]["embedding"] == exact.json()["data"][0]["embedding"]


async def test_base64_decodes_to_the_float_vectors(fake_http: httpx.AsyncClient) -> None:
    floats = await fake_http.post("/v1/embeddings", json={"input": ["x y", "z"]})
    b64 = await fake_http.post("/v1/embeddings", json={"input": ["x y", "z"], "encoding_format": "base64"})
    for f, b in zip(floats.json()["data"], b64.json()["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.asarray(f["embedding"], dtype=np.float32))


@pytest.mark.parametrize(
    ("settings", "listed"),
    [
        ({}, True),  # the default model, Qwen3-Embedding-0.6B
        ({"model_name": "BAAI/bge-small-en-v1.5"}, False),
        ({"demo": True}, False),
        ({"model_path": "/models/Qwen3-Embedding-4B"}, True),  # a local copy, by its folder name
        ({"model_path": "/models/minilm"}, False),  # the default model_name must not count for it
        ({"model_path": "/models/x", "served_model_name": "Qwen/Qwen3-Embedding-8B"}, True),
        ({"model_name": "org/custom", "matryoshka_models": "org/custom,other"}, True),
    ],
)
def test_matryoshka_models_setting(settings: dict[str, Any], listed: bool) -> None:
    assert make_settings(**settings).matryoshka_listed is listed


async def test_utf8_byte_order_mark_is_ignored(fake_http: httpx.AsyncClient) -> None:
    body = b'{"input": "caf\xc3\xa9"}'
    plain = await fake_http.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    marked = await fake_http.post(
        "/v1/embeddings", content=b"\xef\xbb\xbf" + body, headers={"content-type": "application/json"}
    )
    assert marked.status_code == 200, marked.text
    assert marked.json()["data"] == plain.json()["data"]
