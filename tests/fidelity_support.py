"""Shared by the fidelity tests: a fake-engine app with small limits, so that every limit is cheap to hit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from embedding_service.backends.fake.embed import FakeBackend

from .conftest import fake_app

MAX_LEN = 64  # the fake model's token limit
DIM = 64  # the fake model's dimension (Matryoshka: 32..64)
MAX_TOKENS = 5000  # request token cap in these tests
MAX_BODY = 65536
JSON = {"content-type": "application/json"}


def words(n: int) -> str:
    """A text of n whitespace words: the fake tokenizer makes it n tokens plus end-of-text."""
    return " ".join(f"w{i}" for i in range(n))


@asynccontextmanager
async def fake_client(
    *, matryoshka: bool = True, name: str = "fake-model", **settings: object
) -> AsyncIterator[httpx.AsyncClient]:
    """conftest.fake_app with these tests' small limits."""
    backend = FakeBackend(dimension=DIM, max_model_len=MAX_LEN, matryoshka=matryoshka)
    options = {"max_model_len": MAX_LEN, "max_request_tokens": MAX_TOKENS, "batch_timeout_ms": 1}
    async with fake_app(backend=backend, options=options, served_model_name=name, max_body_bytes=MAX_BODY,
                        **settings) as served:
        yield served.http


def offline_tiktoken_dir() -> Path:
    """tiktoken's cl100k_base as vendored by llama-index-core (cache layout: sha1 of the URL as the name)."""
    core = pytest.importorskip("llama_index.core")
    pytest.importorskip("tiktoken")
    folder = Path(core.__file__).parent / "_static" / "tiktoken_cache"
    if not (folder / "9b5ad71b2ce5302211f9c61530b329a4922fc6a4").is_file():
        pytest.skip("this llama-index-core does not vendor cl100k_base")
    return folder
