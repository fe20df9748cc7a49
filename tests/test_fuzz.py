"""Fuzzing: schemathesis against the server's own OpenAPI schema, hypothesis-made bodies, and hostile input.

Every request must get an answer that is not a server error: a 200 of the right shape, or a 4xx in the
OpenAI envelope.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.engine.engine import EmbeddingEngine

from .conftest import ServerProcess, engine_options, fake_app_over, in_process_client

MAX_BODY = 64 * 1024


def assert_clean(response: httpx.Response, sent: Any = None) -> None:
    assert response.status_code < 500, (sent, response.status_code, response.text[:500])
    body = response.json()
    if response.status_code == 200:
        if isinstance(body.get("data"), list):
            assert body["object"] == "list"
            assert [item["index"] for item in body["data"]] == list(range(len(body["data"])))
    else:
        assert 400 <= response.status_code < 500
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# --- schemathesis against a real server's /openapi.json ------------------------------------------------
FUZZ_KEY = "sk-fuzz-0123456789"


def _fuzz_server(*extra: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    # Both models served (the fake engine's embedder and reranker), so every operation has a positive path.
    server = ServerProcess(["--engine", "fake", "--rerank-model", "fake-reranker", "--max-model-len", "64",
                            "--max-body-bytes", str(MAX_BODY), "--batch-timeout-ms", "0", "--log-level", "WARNING",
                            *extra], env=env)
    try:
        server.wait_healthy(60)
        yield server
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerProcess]:
    yield from _fuzz_server()


@pytest.fixture(scope="module")
def keyed_fuzz_server() -> Iterator[ServerProcess]:
    # ignored_auth and missing_required_header make failed key attempts on every operation: more than the
    # default 30 a minute from one address once there are 15 operations, and the 429 that then answers a
    # request without a key is not the 401 those checks look for.
    yield from _fuzz_server("--rate-limit-rpm", "100000000", "--auth-failures-per-minute", "100000",
                            env={"EMBEDDING_API_KEYS": FUZZ_KEY})


def _run_schemathesis(server: ServerProcess, tmp_path: Path, *extra: str) -> dict[str, int]:
    """schemathesis's own runner on every operation of the server's /openapi.json: its examples, its coverage
    phase (boundary and invalid values of every field, unlisted methods, missing headers) and random fuzzing,
    positive and negative data. Every check but positive_data_acceptance: a schema-valid request may still
    be refused for what no static schema knows (the served model's size, token limits, dimensions range).
    Returns the operations tested, with their test-case counts."""
    pytest.importorskip("schemathesis")
    junit = tmp_path / "schemathesis.xml"
    cli = Path(sys.executable).with_name("schemathesis")
    command = [str(cli), "run", server.url + "/openapi.json", "--checks", "all",
               "--exclude-checks", "positive_data_acceptance", "--phases", "examples,coverage,fuzzing",
               "--mode", "all", "--max-examples", "50", "--workers", "1", "--request-timeout", "10",
               "--generation-database", "none", "--no-color", "--report", "junit",
               "--report-junit-path", str(junit), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-2000:]
    tested = {case.get("name", ""): int(case.get("tests", "0") or 0)
              for case in ElementTree.parse(junit).getroot().iter("testcase")}
    return tested


_OPERATIONS = {"GET /", "GET /health", "GET /metrics", "GET /v1/models", "GET /v1/models/{model_id}",
               "POST /v1/embeddings", "POST /embeddings", "POST /v1/rerank", "POST /rerank", "POST /v2/rerank",
               "POST /v1/score", "POST /v2/embed", "POST /v1/embed", "POST /tokenize", "POST /detokenize",
               "GET /health/live", "GET /health/ready", "POST /embed_sparse", "POST /embed_all"}


@pytest.mark.slow
def test_schemathesis_finds_nothing_the_document_does_not_say(fuzz_server: ServerProcess, tmp_path: Path) -> None:
    """Valid and invalid requests to every operation: no 5xx; status codes, headers, content types and
    bodies all as /openapi.json documents them; data the document rules out is refused."""
    tested = _run_schemathesis(fuzz_server, tmp_path)
    assert set(tested) == _OPERATIONS, tested


@pytest.mark.slow
def test_schemathesis_with_api_keys(keyed_fuzz_server: ServerProcess, tmp_path: Path) -> None:
    """With keys and rate limits on: the documented bearer scheme is enforced (ignored_auth retries each
    operation without the key and with a wrong one) and the 401/429 documentation holds."""
    tested = _run_schemathesis(keyed_fuzz_server, tmp_path, "--header", f"Authorization: Bearer {FUZZ_KEY}")
    assert set(tested) == _OPERATIONS, tested


# --- hypothesis-made bodies, in process ------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def fuzz_client(fuzz_loop: asyncio.AbstractEventLoop) -> Iterator[httpx.AsyncClient]:
    engine = EmbeddingEngine(FakeBackend(dimension=16, max_model_len=64),
                             engine_options(max_model_len=64, batch_timeout_ms=0, max_inputs_per_request=64))
    fuzz_loop.run_until_complete(engine.start())
    app = fake_app_over(engine, max_body_bytes=MAX_BODY)
    client = in_process_client(app)
    yield client
    fuzz_loop.run_until_complete(client.aclose())
    fuzz_loop.run_until_complete(engine.stop())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
texts = st.text(min_size=0, max_size=40)
inputs = (texts | st.lists(texts, max_size=5) | st.lists(st.integers(-2**70, 2**70), max_size=6)
          | st.lists(st.lists(st.integers(-5, 40000), max_size=5), max_size=3) | json_values)
bodies = st.fixed_dictionaries(
    {"input": inputs},
    optional={
        "model": json_values,
        "encoding_format": st.sampled_from(["float", "base64", "", "FLOAT", None, 1]),
        "dimensions": st.integers(-2**65, 2**65) | json_values,
        "instruction": texts | json_values,
        "truncate": st.booleans() | json_values,
        "user": texts,
    },
) | json_values


def post(client: httpx.AsyncClient, loop: asyncio.AbstractEventLoop, content: bytes) -> httpx.Response:
    request = client.post("/v1/embeddings", content=content, headers={"content-type": "application/json"})
    return loop.run_until_complete(asyncio.wait_for(request, 10))


@given(body=bodies)
@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_bodies_get_a_clean_answer(body: Any, fuzz_client: httpx.AsyncClient,
                                             fuzz_loop: asyncio.AbstractEventLoop) -> None:
    content = json.dumps(body, allow_nan=False).encode("utf-8", "surrogatepass")
    response = post(fuzz_client, fuzz_loop, content)
    assert_clean(response, body)
    if response.status_code == 200:
        data = response.json()["data"]
        raw = body["input"]
        expected = 1 if isinstance(raw, str) or (raw and not isinstance(raw[0], list | str)) else len(raw)
        assert len(data) == expected


@given(raw=st.binary(max_size=300))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_arbitrary_bytes_get_a_clean_answer(raw: bytes, fuzz_client: httpx.AsyncClient,
                                            fuzz_loop: asyncio.AbstractEventLoop) -> None:
    assert_clean(post(fuzz_client, fuzz_loop, raw), raw)


HOSTILE: dict[str, bytes] = {
    "malformed json": b'{"input": ["a", }',
    "truncated": b'{"input": "abc',
    "not an object": b'["input"]',
    "deep nesting": b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "deep nesting in options": b'{"input": "a", "user": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
    "lone surrogate": b'{"input": "abc \\ud800 def"}',
    "lone surrogate in list": b'{"input": ["fine", "\\udfff"]}',
    "raw invalid utf-8": b'{"input": "\xff\xfe"}',
    "nul escaped": b'{"input": "a\\u0000b"}',
    "nul raw": b'{"input": "a\x00b"}',
    "wrong type input": b'{"input": 12.5}',
    "wrong type dimensions": b'{"input": "a", "dimensions": "8"}',
    "negative dimensions": b'{"input": "a", "dimensions": -1}',
    "huge dimensions": b'{"input": "a", "dimensions": 99999999999999999999999999}',
    "negative token id": b'{"input": [[1, -5, 3]]}',
    "huge token id": b'{"input": [18446744073709551616]}',
    "float token id": b'{"input": [1.5, 2]}',
    "bool token": b'{"input": [true, false]}',
    "mixed list": b'{"input": ["a", 1]}',
    "empty list": b'{"input": []}',
    "empty string": b'{"input": ""}',
    "null input": b'{"input": null}',
    "nan": b'{"input": "a", "dimensions": NaN}',
    "infinity": b'{"input": "a", "dimensions": 1e999}',
    "too many inputs": json.dumps({"input": ["x"] * 65}).encode(),
    "too long input": json.dumps({"input": "word " * 500}).encode(),
    "huge body": b'{"input": "' + b"a" * (MAX_BODY + 10) + b'"}',
    "empty body": b"",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_gets_a_clean_4xx(name: str, fuzz_client: httpx.AsyncClient,
                                        fuzz_loop: asyncio.AbstractEventLoop) -> None:
    response = post(fuzz_client, fuzz_loop, HOSTILE[name])
    assert_clean(response, name)
    assert 400 <= response.status_code < 500, (name, response.status_code)
    if name == "huge body":
        assert response.status_code == 413
