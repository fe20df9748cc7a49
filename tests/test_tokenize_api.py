"""POST /tokenize and /detokenize (vLLM's shapes) on the fake engine: the count is what /v1/embeddings bills
for the same text and options; limits and bad input as for embeddings."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .conftest import FakeApp, fake_app

TEXT = "what is the capital of China"


@pytest.fixture
async def served() -> AsyncIterator[FakeApp]:
    async with fake_app() as app:
        yield app


async def _billed(app: FakeApp, **extra: object) -> int:
    response = await app.http.post("/v1/embeddings", json={"input": TEXT, **extra})
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens"])


@pytest.mark.parametrize("options", [{}, {"instruction": "Given a question, find answers"}, {"truncate": True}])
async def test_count_is_what_embeddings_bill(served: FakeApp, options: dict) -> None:
    response = await served.http.post("/tokenize", json={"prompt": TEXT, **options})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == len(body["tokens"]) == await _billed(served, **options)
    assert body["max_model_len"] == 64 and body["token_strs"] is None


async def test_add_special_tokens_false_leaves_out_the_end_token(served: FakeApp) -> None:
    whole = (await served.http.post("/tokenize", json={"prompt": TEXT})).json()["tokens"]
    bare = (await served.http.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False})).json()
    assert whole[-1] == 2 and bare["tokens"] == whole[:-1] and bare["count"] == len(whole) - 1  # fake's eos: 2


async def test_limits_and_errors_are_the_embeddings_ones(served: FakeApp) -> None:
    long = "w " * 100
    refused = await served.http.post("/tokenize", json={"prompt": long})
    assert refused.status_code == 400 and "this model's limit of 64" in refused.json()["error"]["message"]
    cut = (await served.http.post("/tokenize", json={"prompt": long, "truncate": True})).json()
    assert cut["count"] == 64
    for body, param in (({}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": "x", "messages": []}, "messages"),
                        ({"prompt": "x", "input_type": "image"}, "input_type"),
                        ({"prompt": "x", "instruction": " "}, "instruction"), ({"prompt": "x", "model": 5}, "model"),
                        ({"prompt": "x", "add_special_tokens": "no"}, "add_special_tokens"),
                        ({"prompt": "x", "return_token_strs": True}, "return_token_strs"),  # the fake: no vocabulary
                        ({"tokens": "1 2"}, "tokens")):
        path = "/detokenize" if "tokens" in body else "/tokenize"
        response = await served.http.post(path, json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (body, response.text)
    assert (await served.http.post("/detokenize", json={"tokens": [5, 40000]})).json()["error"]["param"] == "tokens"
