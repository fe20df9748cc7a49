"""On real models (the tiny random Qwen3 and all-MiniLM-L6-v2, torch engine, in-process): base64 equals float,
token ids equal text (with or without the special tokens), Matryoshka prefixes, usage and truncation.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio

from embedding_service.api.app import create_app
from embedding_service.service import build_engine, plan_model

from .conftest import make_settings

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

LIMIT = 64  # a small max_model_len, so that truncation is cheap to reach
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors",
    "naïve café ☕ 東京",
]


@dataclass
class Served:
    name: str
    http: httpx.AsyncClient
    tokenizer: Any
    dimension: int
    matryoshka: bool

    async def embed(self, payload: dict[str, Any]) -> httpx.Response:
        return await self.http.post("/v1/embeddings", json=payload)

    async def vectors(self, payload: dict[str, Any]) -> np.ndarray:
        response = await self.embed(payload)
        assert response.status_code == 200, response.text
        rows = [item["embedding"] for item in response.json()["data"]]
        if payload.get("encoding_format") == "base64":
            return np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in rows])
        return np.asarray(rows, dtype=np.float32)


async def _serve(name: str, model_dir: Path, **settings: Any) -> AsyncIterator[Served]:
    from transformers import AutoTokenizer

    config = make_settings(
        engine="torch", model_path=str(model_dir), served_model_name=name, max_model_len=LIMIT, batch_timeout_ms=0,
        **settings,
    )
    engine = build_engine(plan_model(config))
    await engine.start()
    app = create_app(config, engine)
    assert engine.info is not None
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            yield Served(
                name,
                http,
                AutoTokenizer.from_pretrained(str(model_dir)),
                engine.info.dimension,
                engine.info.matryoshka,
            )
    finally:
        await engine.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def qwen(tiny_qwen_dir: Path) -> AsyncIterator[Served]:
    # Served under a name that is not in matryoshka_models: Matryoshka must come from the Qwen3 config.
    async for served in _serve("tiny-qwen3", tiny_qwen_dir):
        yield served


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def minilm(minilm_dir: Path) -> AsyncIterator[Served]:
    async for served in _serve("all-MiniLM-L6-v2", minilm_dir, demo=True):
        yield served


@pytest.fixture(params=["qwen", "minilm"])
def model(request: pytest.FixtureRequest) -> Served:
    return request.getfixturevalue(request.param)


async def test_base64_equals_float(model: Served) -> None:
    floats = await model.vectors({"input": TEXTS})
    b64 = await model.vectors({"input": TEXTS, "encoding_format": "base64"})
    assert floats.shape == (len(TEXTS), model.dimension)
    np.testing.assert_array_equal(b64, floats)
    np.testing.assert_allclose(np.linalg.norm(floats, axis=1), 1.0, atol=1e-5)


async def test_token_ids_equal_text(model: Served) -> None:
    text_vectors = await model.vectors({"input": TEXTS})
    bare = [model.tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    full = [model.tokenizer.encode(text, add_special_tokens=True) for text in TEXTS]
    assert all(len(f) > len(b) for f, b in zip(full, bare, strict=True)), "the tokenizer adds special tokens"
    for ids in (bare, full):  # special tokens are added when missing, so both equal the text
        np.testing.assert_allclose(await model.vectors({"input": ids}), text_vectors, atol=2e-6)
    flat = await model.vectors({"input": bare[0]})
    np.testing.assert_allclose(flat[0], text_vectors[0], atol=2e-6)


async def test_usage_counts_the_tokens_embedded(model: Served) -> None:
    response = await model.embed({"input": TEXTS})
    expected = sum(len(model.tokenizer.encode(text)) for text in TEXTS)  # special tokens included
    assert response.json()["usage"] == {"prompt_tokens": expected, "total_tokens": expected}
    ids = await model.embed({"input": [model.tokenizer.encode(TEXTS[0], add_special_tokens=False)]})
    assert ids.json()["usage"]["prompt_tokens"] == len(model.tokenizer.encode(TEXTS[0]))


async def test_instruction_is_counted_and_changes_the_vector(qwen: Served) -> None:
    instruction = "Find similar passages"  # short: the prompt must fit in LIMIT tokens
    response = await qwen.embed({"input": TEXTS[0], "instruction": instruction})
    expected = len(qwen.tokenizer.encode(f"Instruct: {instruction}\nQuery:{TEXTS[0]}"))
    assert response.json()["usage"]["prompt_tokens"] == expected
    plain = await qwen.vectors({"input": TEXTS[0]})
    assert not np.allclose(np.asarray(response.json()["data"][0]["embedding"]), plain[0])


async def test_matryoshka_prefix_is_renormalised(qwen: Served) -> None:
    assert qwen.matryoshka and qwen.dimension == 128
    full = await qwen.vectors({"input": TEXTS})
    for dims in (32, 64, 127):
        for fmt in ("float", "base64"):
            short = await qwen.vectors({"input": TEXTS, "dimensions": dims, "encoding_format": fmt})
            prefix = full[:, :dims] / np.linalg.norm(full[:, :dims], axis=1, keepdims=True)
            assert short.shape == (len(TEXTS), dims)
            np.testing.assert_allclose(short, prefix, atol=1e-6)
    for bad in (16, 129):
        response = await qwen.embed({"input": "x", "dimensions": bad})
        assert response.status_code == 400
        assert "between 32 and 128" in response.json()["error"]["message"]


async def test_dimensions_refused_on_minilm(minilm: Served) -> None:
    assert not minilm.matryoshka
    response = await minilm.embed({"input": "x", "dimensions": 128})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (
        error["param"] == "dimensions"
        and "not a Matryoshka" in error["message"]
        and "384" in error["message"]
    )
    same = await minilm.vectors({"input": "x", "dimensions": 384})
    assert same.shape == (1, 384)


async def test_long_input_is_refused_or_truncated_keeping_the_start(model: Served) -> None:
    long_text = " ".join(["lorem ipsum dolor sit amet"] * 20)
    full = model.tokenizer.encode(long_text)
    assert len(full) > LIMIT
    refused = await model.embed({"input": long_text})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert f"has {len(full)} tokens" in error["message"] and f"limit of {LIMIT}" in error["message"]
    cut = await model.embed({"input": long_text, "truncate": True})
    assert cut.json()["usage"]["prompt_tokens"] == LIMIT
    # What was embedded: the first tokens, then the closing special tokens the tokenizer adds.
    bare = model.tokenizer.encode(long_text, add_special_tokens=False)
    start = next(i for i in range(len(full)) if full[i : i + len(bare)] == bare)
    prefix, suffix = full[:start], full[start + len(bare) :]
    kept = prefix + bare[: LIMIT - len(prefix) - len(suffix)] + suffix
    expected = await model.vectors({"input": [kept]})
    np.testing.assert_allclose(np.asarray(cut.json()["data"][0]["embedding"]), expected[0], atol=2e-6)
