"""Shared by the fidelity tests: a fake-engine app with small limits, so that every limit is cheap to hit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from embedding_service.api.app import create_app
from embedding_service.backends.fake import FakeBackend
from embedding_service.engine.engine import EmbeddingEngine

from .conftest import engine_options, make_settings

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
    backend = FakeBackend(dimension=DIM, max_model_len=MAX_LEN, matryoshka=matryoshka)
    options = engine_options(max_model_len=MAX_LEN, max_request_tokens=MAX_TOKENS, batch_timeout_ms=1)
    engine = EmbeddingEngine(backend, options)
    await engine.start()
    config = make_settings(engine="fake", served_model_name=name, max_body_bytes=MAX_BODY, **settings)
    app = create_app(config, engine)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            yield http
    finally:
        await engine.stop()


def offline_tiktoken_dir() -> Path:
    """tiktoken's cl100k_base as vendored by llama-index-core (cache layout: sha1 of the URL as the name)."""
    core = pytest.importorskip("llama_index.core")
    pytest.importorskip("tiktoken")
    folder = Path(core.__file__).parent / "_static" / "tiktoken_cache"
    if not (folder / "9b5ad71b2ce5302211f9c61530b329a4922fc6a4").is_file():
        pytest.skip("this llama-index-core does not vendor cl100k_base")
    return folder
