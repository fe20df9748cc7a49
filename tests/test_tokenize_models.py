"""/tokenize's ids are what the embedding path feeds the model: sent back as token ids they give the same
vector as the text (prompted by input_type, and not), on all-MiniLM-L6-v2 and the tiny Qwen3 (torch engine,
in process); token strings and /detokenize equal the model's tokenizer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio

from embedding_service.api.app import create_app
from embedding_service.service import build_engine, plan_model

from .conftest import make_settings

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

TEXT = "naïve café: what is the capital of China?"


async def _serve(model_dir: Path, **settings: object) -> AsyncIterator[httpx.AsyncClient]:
    config = make_settings(engine="torch", dtype="float32", model_path=str(model_dir), batch_timeout_ms=0,
                           **settings)
    engine = build_engine(plan_model(config))
    await engine.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(config, engine)),
                                     base_url="http://test") as http:
            yield http
    finally:
        await engine.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def minilm(minilm_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for http in _serve(minilm_dir, demo=True):
        yield http


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def qwen(tiny_qwen_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for http in _serve(tiny_qwen_dir):
        yield http


@pytest.fixture(params=["minilm", "qwen"])
def model(request: pytest.FixtureRequest) -> httpx.AsyncClient:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


async def _vector(http: httpx.AsyncClient, **body: object) -> np.ndarray:
    response = await http.post("/v1/embeddings", json=body)
    assert response.status_code == 200, response.text
    return np.array(response.json()["data"][0]["embedding"], dtype=np.float32)


@pytest.mark.parametrize("input_type", [None, "search_query", "classification"])
async def test_ids_are_what_the_model_sees(model: httpx.AsyncClient, input_type: str | None) -> None:
    http = model
    options = {"input_type": input_type} if input_type else {}
    body = (await http.post("/tokenize", json={"prompt": TEXT, **options})).json()
    text_vector = await _vector(http, input=TEXT, **options)
    ids_vector = await _vector(http, input=body["tokens"])
    np.testing.assert_allclose(ids_vector, text_vector, atol=1e-6, rtol=0)
    usage = (await http.post("/v1/embeddings", json={"input": TEXT, **options})).json()["usage"]
    assert body["count"] == usage["prompt_tokens"]


async def test_token_strs_and_detokenize_equal_the_tokenizer(minilm: httpx.AsyncClient, minilm_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    body = (await minilm.post("/tokenize", json={"prompt": TEXT, "return_token_strs": True})).json()
    assert body["tokens"] == tokenizer(TEXT)["input_ids"]
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    assert body["max_model_len"] == 256
    bare = (await minilm.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False})).json()
    assert bare["tokens"] == tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    back = (await minilm.post("/detokenize", json={"tokens": body["tokens"]})).json()
    assert back == {"prompt": tokenizer.decode(body["tokens"])}
