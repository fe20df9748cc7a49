"""`token_ids_tiktoken`: token-id inputs read as tiktoken ids and embedded as their text (fake engine)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from .fidelity_support import fake_client, offline_tiktoken_dir

TEXTS = ["hello world", "Paris is the capital of France.", "naïve café ☕ 東京"]


@pytest.fixture
def cache_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = offline_tiktoken_dir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(folder))
    yield folder


@pytest.fixture
async def http(cache_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with fake_client(token_ids_tiktoken="cl100k_base") as client:
        yield client


def cl100k(text: str) -> list[int]:
    import tiktoken

    return list(tiktoken.get_encoding("cl100k_base").encode(text))


async def vectors(http: httpx.AsyncClient, payload: dict[str, object]) -> list[list[float]]:
    response = await http.post("/v1/embeddings", json=payload)
    assert response.status_code == 200, response.text
    return [item["embedding"] for item in response.json()["data"]]


async def test_token_ids_embed_as_their_text(http: httpx.AsyncClient) -> None:
    as_text = await vectors(http, {"input": TEXTS})
    assert await vectors(http, {"input": [cl100k(text) for text in TEXTS]}) == as_text
    assert await vectors(http, {"input": cl100k(TEXTS[1])}) == as_text[1:2]


async def test_instruction_applies_to_decoded_ids(http: httpx.AsyncClient) -> None:
    payload = {"input": TEXTS[0], "instruction": "Find it"}
    assert await vectors(http, {**payload, "input": [cl100k(TEXTS[0])]}) == await vectors(http, payload)


async def test_ids_outside_the_encoding_are_refused(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/embeddings", json={"input": [[15339], [15339, 10**7]]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (
        error["param"] == "input" and "input[1][1]" in error["message"] and "cl100k_base" in error["message"]
    )


async def test_off_by_default_ids_are_the_models_own(cache_dir: Path) -> None:
    async with fake_client() as plain:
        ids = cl100k(TEXTS[0])
        assert await vectors(plain, {"input": [ids]}) != await vectors(plain, {"input": TEXTS[0]})
