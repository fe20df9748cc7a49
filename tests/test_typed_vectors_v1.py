"""/v1/embeddings takes Cohere's types and input_type too: encoding_format int8/uint8/binary/ubinary equal to
/v2/embed's, input_type mapped to the model's prompts (a fake model that has Qwen3's), bad values a 400."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import numpy as np
import pytest

from embedding_service.backends.base import BackendInfo
from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.engine.input_types import TASK_INSTRUCTIONS
from embedding_service.vector_types import quantize

from .conftest import FakeApp, fake_app

pytestmark = pytest.mark.asyncio

TEXTS = ["Beijing is the capital of China.", "What is the capital of China?"]
QWEN3_PROMPTS = {"query": "Instruct: Given a web search query, retrieve relevant passages that answer the query"
                          "\nQuery:", "document": ""}


class PromptedFake(FakeBackend):
    """The fake model with Qwen3-Embedding's sentence-transformers prompts."""

    def load(self) -> BackendInfo:
        return dataclasses.replace(super().load(), prompts=dict(QWEN3_PROMPTS))


@pytest.fixture
async def served() -> AsyncIterator[FakeApp]:
    async with fake_app(backend=PromptedFake(dimension=64, max_model_len=64)) as app:
        yield app


async def _v1(app: FakeApp, **body: object) -> dict:
    response = await app.http.post("/v1/embeddings", json={"input": TEXTS, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _rows(body: dict, dtype: type) -> np.ndarray:
    return np.array([row["embedding"] for row in body["data"]], dtype=dtype)


@pytest.mark.parametrize("kind", ["int8", "uint8", "binary", "ubinary"])
async def test_quantized_formats_equal_the_rule_and_v2(served: FakeApp, kind: str) -> None:
    floats = _rows(await _v1(served), np.float32)
    typed = await _v1(served, encoding_format=kind)
    dtype = np.int8 if kind in ("int8", "binary") else np.uint8
    assert _rows(typed, dtype).tobytes() == quantize(floats, kind).tobytes()  # type: ignore[arg-type]
    v2 = (await served.http.post("/v2/embed", json={"texts": TEXTS, "embedding_types": [kind]})).json()
    assert v2["embeddings"][kind] == [row["embedding"] for row in typed["data"]]
    assert typed["usage"] == (await _v1(served))["usage"]


async def test_input_type_uses_the_model_s_prompts_on_both_apis(served: FakeApp) -> None:
    plain = await _v1(served)
    query = await _v1(served, input_type="search_query")
    assert _rows(query, np.float32).tobytes() == _rows(await _v1(served, prompt_name="query"), np.float32).tobytes()
    assert query["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    document = await _v1(served, input_type="search_document")  # Qwen3's "document" prompt is empty
    assert _rows(document, np.float32).tobytes() == _rows(plain, np.float32).tobytes()
    for task, instruction in TASK_INSTRUCTIONS.items():
        got = _rows(await _v1(served, input_type=task), np.float32)
        assert got.tobytes() == _rows(await _v1(served, instruction=instruction), np.float32).tobytes()
    explicit = await _v1(served, input_type="search_query", instruction="Find code")  # explicit wins
    assert _rows(explicit, np.float32).tobytes() == _rows(await _v1(served, instruction="Find code"),
                                                          np.float32).tobytes()
    v2 = (await served.http.post("/v2/embed", json={"texts": TEXTS, "input_type": "search_query"})).json()
    assert np.array(v2["embeddings"]["float"], dtype=np.float32).tobytes() == _rows(query, np.float32).tobytes()
    assert v2["meta"]["billed_units"]["input_tokens"] == query["usage"]["prompt_tokens"]


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"input": "a", "encoding_format": "float16"}, "encoding_format", "encoding_format must be one of"),
    ({"input": "a", "input_type": "image"}, "input_type", "input_type must be one of"),
    ({"input": "a", "input_type": 3}, "input_type", "invalid 'input_type'"),
    ({"input": [1, 2, 3], "input_type": "search_query"}, "input_type", "text input only"),
])
async def test_bad_values_are_a_400_in_the_openai_envelope(served: FakeApp, body: dict, param: str,
                                                           words: str) -> None:
    response = await served.http.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
