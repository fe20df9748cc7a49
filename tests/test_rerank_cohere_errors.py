"""POST /v2/rerank answers its errors in Cohere's shape, `{"id", "message"}`, which the real cohere SDK
(`AsyncClientV2.rerank`, over the in-process app) raises as its typed errors (BadRequestError & co.) with the
body; the message is the one /v1/rerank words in the OpenAI envelope."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from .test_rerank_api import BAD, QUERY, _client

pytestmark = pytest.mark.asyncio

cohere = pytest.importorskip("cohere")
from cohere.core.api_error import ApiError  # noqa: E402
from cohere.errors import BadRequestError  # noqa: E402


@pytest.fixture
async def both() -> AsyncIterator[httpx.AsyncClient]:
    async for http in _client(max_body_bytes=4096):
        yield http


def _sdk(http: httpx.AsyncClient) -> Any:
    return cohere.AsyncClientV2(api_key="unused", base_url="http://test", httpx_client=http)


def _cohere_shaped(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"id", "message"} and body["id"] and body["message"], body
    return str(body["message"])


@pytest.mark.parametrize("body", [b[1] for b in BAD], ids=[b[0] for b in BAD])
async def test_every_bad_request_is_cohere_shaped_with_the_same_message(both: httpx.AsyncClient,
                                                                        body: Any) -> None:
    openai = (await both.post("/v1/rerank", json=body)).json()["error"]["message"]
    assert _cohere_shaped(await both.post("/v2/rerank", json=body), 400) == openai


@pytest.mark.parametrize(("call", "words"), [
    ({"query": QUERY, "documents": ["a", "w " * 40]}, "documents[1]"),
    ({"query": QUERY, "documents": ["a", "b"], "top_n": 3}, "top_n"),
    ({"query": "", "documents": ["a"]}, "query"),
    ({"query": QUERY, "documents": []}, "documents"),
    ({"query": QUERY, "documents": ["a"], "max_tokens_per_doc": 0}, "max_tokens_per_doc"),
])
async def test_the_sdk_raises_bad_request_with_the_message(both: httpx.AsyncClient, call: dict[str, Any],
                                                           words: str) -> None:
    with pytest.raises(BadRequestError) as raised:
        await _sdk(both).rerank(model="rerank-v3.5", **call)
    assert raised.value.status_code == 400 and words in raised.value.body["message"], raised.value.body


async def test_transport_and_model_errors_are_cohere_shaped(both: httpx.AsyncClient) -> None:
    big = {"query": QUERY, "documents": ["w " * 3000]}
    assert "4096" in _cohere_shaped(await both.post("/v2/rerank", json=big), 413)
    plain = await both.post("/v2/rerank", content=b"{}", headers={"Content-Type": "text/plain"})
    assert "Content-Type" in _cohere_shaped(plain, 415)
    async for embed_only in _client(rerank=False):  # no reranker: the SDK's typed error, Cohere's body
        with pytest.raises(ApiError) as raised:
            await _sdk(embed_only).rerank(model="rerank-v3.5", query=QUERY, documents=["a"])
        assert raised.value.status_code in (400, 404) and "rerank" in raised.value.body["message"]
