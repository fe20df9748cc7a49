"""POST /v2/embed in process on the fake engine, through the real cohere SDK (AsyncClientV2 over the ASGI app):
every embedding type equals the rule applied to the /v1/embeddings floats, truncation and max_tokens, and bad
input answered in Cohere's error shape."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest

from embedding_service.vector_types import unit_ranges

from .conftest import FakeApp, fake_app

pytestmark = pytest.mark.asyncio

cohere = pytest.importorskip("cohere")
st_quantization = pytest.importorskip("sentence_transformers.util.quantization")

TEXTS = ["Beijing is the capital of China.", "Gravity pulls apples down.", "What is the capital of China?"]
ALL_TYPES = ["float", "int8", "uint8", "binary", "ubinary", "base64"]


@pytest.fixture
async def served() -> AsyncIterator[FakeApp]:
    async with fake_app() as app:
        yield app


def _sdk(app: FakeApp) -> object:
    return cohere.AsyncClientV2(api_key="unused", base_url="http://test", httpx_client=app.http)


async def _floats(http: httpx.AsyncClient, texts: list[str], **extra: object) -> np.ndarray:
    response = await http.post("/v1/embeddings", json={"input": texts, **extra})
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


def _f32(body: dict) -> bytes:
    return np.array(body["embeddings"]["float"], dtype=np.float32).tobytes()


async def test_every_type_through_the_sdk_equals_the_rules(served: FakeApp) -> None:
    floats = await _floats(served.http, TEXTS)
    response = await _sdk(served).embed(model="fake-model", texts=TEXTS, input_type="search_document",
                                        embedding_types=ALL_TYPES)
    assert response.response_type == "embeddings_by_type" and response.texts == TEXTS and response.id
    usage = (await served.http.post("/v1/embeddings", json={"input": TEXTS})).json()["usage"]
    assert response.meta.billed_units.input_tokens == usage["prompt_tokens"] > 0
    got = response.embeddings
    assert np.array(got.float_, dtype=np.float32).tobytes() == floats.tobytes()
    decoded = np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in got.base64])
    assert decoded.tobytes() == floats.tobytes()
    ranges = unit_ranges(floats.shape[1])
    for kind in ("int8", "uint8", "binary", "ubinary"):
        expected = st_quantization.quantize_embeddings(
            floats, precision=kind, ranges=ranges if kind.endswith("int8") else None)
        assert np.array(getattr(got, kind)).tolist() == expected.tolist(), kind
    assert len(got.ubinary[0]) == floats.shape[1] // 8


async def test_default_type_is_float_and_output_dimension_is_matryoshka(served: FakeApp) -> None:
    body = (await served.http.post("/v2/embed", json={"texts": TEXTS[:1], "output_dimension": 32})).json()
    assert set(body["embeddings"]) == {"float"}
    expected = await _floats(served.http, TEXTS[:1], dimensions=32)
    assert np.array(body["embeddings"]["float"], dtype=np.float32).tobytes() == expected.tobytes()
    packed = (await served.http.post("/v2/embed", json={"texts": TEXTS[:1], "output_dimension": 32,
                                                        "embedding_types": ["ubinary"]})).json()
    assert packed["embeddings"]["ubinary"] == np.packbits(expected > 0, axis=-1).tolist()  # cut, then packed


async def test_truncate_end_and_start_and_max_tokens(served: FakeApp) -> None:
    text = "w1 w2 w3 w4 w5 w6"  # the fake tokenizer: one id per word, then its end token (7 in all)

    async def embed(**extra: object) -> httpx.Response:
        return await served.http.post("/v2/embed", json={"texts": [text], **extra})

    refused = await embed(max_tokens=4)  # truncate NONE (the default): 400 naming the limit
    assert refused.status_code == 400 and "max_tokens of 4" in refused.json()["message"]
    assert '"truncate": "END"' in refused.json()["message"] and refused.json()["message"].startswith("texts[0]")
    end = (await embed(max_tokens=4, truncate="END")).json()
    start = (await embed(max_tokens=4, truncate="START")).json()
    assert end["meta"]["billed_units"]["input_tokens"] == 4 == start["meta"]["billed_units"]["input_tokens"]
    assert _f32(end) == (await _floats(served.http, ["w1 w2 w3"])).tobytes()  # and its end token
    assert _f32(start) == (await _floats(served.http, ["w4 w5 w6"])).tobytes()
    too_long = await served.http.post("/v2/embed", json={"texts": ["w " * 100]})  # over the model's 64
    assert too_long.status_code == 400 and "this model's limit of 64" in too_long.json()["message"]
    cut = await served.http.post("/v2/embed", json={"texts": ["w " * 100], "truncate": "START"})
    assert cut.status_code == 200 and cut.json()["meta"]["billed_units"]["input_tokens"] == 64


@pytest.mark.parametrize(("body", "words"), [
    ({"texts": ["a"], "embedding_types": ["float16"]}, "unknown embedding type"),
    ({"texts": ["a"], "embedding_types": []}, "non-empty list"),
    ({"texts": ["a"], "input_type": "image"}, "input_type must be one of"),
    ({"texts": []}, "empty list"),
    ({"texts": [""]}, "texts[0] is an empty string"),
    ({"texts": "a"}, "must be a list"),
    ({}, "'texts' is required"),
    ({"texts": ["a"], "images": ["data:image/png;base64,AAAA"]}, "embeds text"),
    ({"texts": ["a"], "truncate": "LEFT"}, "truncate must be one of"),
    ({"texts": ["a"], "max_tokens": 65}, "max_tokens must be between 1 and this model's limit of 64"),
    ({"texts": ["a"], "max_tokens": 0}, "at least 1"),
    ({"texts": ["a"], "output_dimension": 8}, "dimensions must be between 32 and 64"),
    ({"texts": ["a"] * 3000}, "too many inputs"),
])
async def test_bad_input_is_a_400_in_cohere_s_shape(served: FakeApp, body: dict, words: str) -> None:
    response = await served.http.post("/v2/embed", json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert set(error) == {"id", "message"} and words in error["message"], error


async def test_the_sdk_raises_bad_request_with_the_message(served: FakeApp) -> None:
    with pytest.raises(cohere.errors.BadRequestError) as caught:
        await _sdk(served).embed(model="fake-model", texts=["a"], input_type="search_query",
                                 embedding_types=["int4"])
    assert caught.value.status_code == 400 and "unknown embedding type" in caught.value.body["message"]


async def test_input_type_on_a_model_without_prompts() -> None:
    async with fake_app() as app:  # as it is: the same vector as no input_type
        query = (await app.http.post("/v2/embed", json={"texts": TEXTS, "input_type": "search_query"})).json()
        assert _f32(query) == (await _floats(app.http, TEXTS)).tobytes()
    async with fake_app(input_type_strict=True) as app:
        strict = await app.http.post("/v2/embed", json={"texts": TEXTS, "input_type": "search_query"})
        assert strict.status_code == 400 and "input_type_strict" in strict.json()["message"]
        document = await app.http.post("/v2/embed", json={"texts": TEXTS, "input_type": "search_document"})
        assert document.status_code == 200


async def test_a_long_text_is_counted_from_the_end_it_keeps(served: FakeApp) -> None:
    """Over 32k characters a text is counted in slices (engine/tokenize.py): from its end for START."""
    words = [f"w{i}" for i in range(8000)]  # ~48k characters
    for truncate, kept in (("END", words[:63]), ("START", words[-63:])):  # 63 words + the end token = 64
        body = (await served.http.post("/v2/embed", json={"texts": [" ".join(words)], "truncate": truncate})).json()
        assert body["meta"]["billed_units"]["input_tokens"] == 64
        assert _f32(body) == (await _floats(served.http, [" ".join(kept)])).tobytes(), truncate
