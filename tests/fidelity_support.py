"""Shared by the fidelity tests: a fake-engine app with small limits, so that every limit is cheap to hit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from conftest import make_settings

from embedding_service.api.app import create_app
from embedding_service.backends.fake import FakeBackend
from embedding_service.engine.engine import EmbeddingEngine, EngineOptions

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
    *, matryoshka: bool = True, name: str = "fake-model"
) -> AsyncIterator[httpx.AsyncClient]:
    backend = FakeBackend(dimension=DIM, max_model_len=MAX_LEN, matryoshka=matryoshka)
    options = EngineOptions(max_model_len=MAX_LEN, max_request_tokens=MAX_TOKENS, batch_timeout_ms=1)
    engine = EmbeddingEngine(backend, options)
    await engine.start()
    app = create_app(make_settings(engine="fake", served_model_name=name, max_body_bytes=MAX_BODY), engine)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            yield http
    finally:
        await engine.stop()
