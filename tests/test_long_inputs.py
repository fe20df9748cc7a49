"""Long inputs on the fake engine, in process: the policy (server setting, per-request field, truncate's older
name), chunk-and-pool equal to the backend's own vectors of the windows, what the response says, the bound on
a 1 MB input's windows in flight, and bad input in each API's envelope. Real models: test_long_inputs_fidelity.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.engine.chunking import WAVES_IN_FLIGHT

from .conftest import FakeApp, engine_options, fake_app, make_settings

pytestmark = pytest.mark.asyncio

LIMIT = 64
WIDTH = LIMIT - 1  # the fake tokenizer adds one end token


def words(count: int, offset: int = 0) -> str:
    return " ".join(f"w{offset + i}" for i in range(count))


@pytest.fixture
async def chunking() -> AsyncIterator[FakeApp]:
    async with fake_app(options={"long_inputs": "chunk", "max_chunked_input_tokens": 1000}) as app:
        yield app


def _reference(backend: FakeBackend, text: str) -> tuple[np.ndarray, int, int]:
    """The fake's own vectors of each window, token-weighted, renormalised: (vector, windows, tokens)."""
    body = backend.tokenize([text])[0][:-1]
    windows = [[*body[k:k + WIDTH], 2] for k in range(0, len(body), WIDTH)]
    weights = np.array([len(w) - 1 for w in windows], dtype=np.float64)
    mean = (backend.embed(windows).astype(np.float64) * weights[:, None]).sum(axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32), len(windows), sum(map(len, windows))


def _rows(body: dict[str, Any]) -> np.ndarray:
    return np.array([row["embedding"] for row in body["data"]], dtype=np.float32)


async def test_server_chunk_equals_the_windows_weighted_mean(chunking: FakeApp) -> None:
    backend = chunking.engine.backend
    assert isinstance(backend, FakeBackend)
    long_a, long_b = words(200), words(130, offset=500)
    response = await chunking.http.post("/v1/embeddings", json={"input": ["short one", long_a, long_b]})
    assert response.status_code == 200, response.text
    rows = _rows(response.json())
    (a, windows_a, tokens_a), (b, windows_b, tokens_b) = _reference(backend, long_a), _reference(backend, long_b)
    np.testing.assert_allclose(rows[1], a, atol=1e-6)
    np.testing.assert_allclose(rows[2], b, atol=1e-6)
    assert rows[0].tobytes() == backend.embed(backend.tokenize(["short one"]))[0].tobytes()
    assert response.json()["usage"]["prompt_tokens"] == 3 + tokens_a + tokens_b
    assert response.headers["X-Chunked-Inputs"] == f"1:{windows_a},2:{windows_b}"
    # A text over a tokenisation slice (32K characters) is tokenised slice by slice: the same ids.
    longer = words(9000)
    assert len(longer) > 40_000
    sliced = await chunking.http.post("/v1/embeddings", json={"input": longer, "long_inputs": "chunk"})
    assert sliced.status_code == 400  # over this app's max_chunked_input_tokens (1000)
    # Token ids are chunked the same way as the text they stand for.
    ids = backend.tokenize([long_a])[0][:-1]
    same = await chunking.http.post("/v1/embeddings", json={"input": [ids]})
    np.testing.assert_allclose(_rows(same.json())[0], a, atol=1e-6)


async def test_request_fields_choose_the_policy(chunking: FakeApp) -> None:
    post = chunking.http.post
    long = words(100)
    not_cut = await post("/v1/embeddings", json={"input": long, "truncate": False})  # chunking cuts nothing
    assert not_cut.status_code == 200 and not_cut.headers["X-Chunked-Inputs"] == "0:2"
    refused = await post("/v1/embeddings", json={"input": long, "long_inputs": "refuse"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    cut = await post("/v1/embeddings", json={"input": [long, "x", long, long], "truncate": True})
    assert cut.headers["X-Truncated-Inputs"] == "0,2-3" and "X-Chunked-Inputs" not in cut.headers
    assert cut.json()["usage"]["prompt_tokens"] == 3 * LIMIT + 2
    for truncate in ("END", "START"):
        cohere = (await post("/v2/embed", json={"texts": [long], "truncate": truncate})).json()
        assert cohere["meta"]["warnings"] == ["texts[0] was truncated to the token limit"]
    absent = (await post("/v2/embed", json={"texts": ["x", long]})).json()  # no truncate: the server's chunk
    assert absent["meta"]["warnings"] == ["texts[1] was embedded in 2 windows, averaged"]
    short = (await post("/v2/embed", json={"texts": ["x"]})).json()
    assert "warnings" not in short["meta"]


async def test_refuse_by_default_and_chunk_per_request() -> None:
    async with fake_app() as app:
        long = words(100)
        refused = await app.http.post("/v1/embeddings", json={"input": long})
        assert refused.status_code == 400 and f"limit of {LIMIT}" in refused.json()["error"]["message"]
        chunked = await app.http.post("/v1/embeddings", json={"input": long, "long_inputs": "chunk"})
        assert chunked.status_code == 200 and chunked.headers["X-Chunked-Inputs"] == "0:2"
        cohere = await app.http.post("/v2/embed", json={"texts": [long], "long_inputs": "chunk"})
        assert cohere.status_code == 200


@pytest.mark.parametrize(("payload", "param", "words_in_message"), [
    ({"long_inputs": "split"}, "long_inputs", ("refuse, truncate, chunk", "split")),
    ({"long_inputs": 3}, "long_inputs", ("string",)),
    ({"long_inputs": "chunk", "truncate": True}, "long_inputs", ("contradicts truncate",)),
    ({"input": words(1001)}, "input", ("max_chunked_input_tokens", "1000")),
])
async def test_bad_long_input_requests_openai(chunking: FakeApp, payload: dict[str, Any], param: str,
                                              words_in_message: Sequence[str]) -> None:
    response = await chunking.http.post("/v1/embeddings", json={"input": words(100), **payload})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and all(w in error["message"] for w in words_in_message), error


@pytest.mark.parametrize(("payload", "words_in_message"), [
    ({"long_inputs": "split"}, ("refuse, truncate, chunk",)),
    ({"long_inputs": ["chunk"]}, ("string",)),
    ({"long_inputs": "chunk", "truncate": "END"}, ("contradicts truncate",)),
    ({"texts": [words(1001)]}, ("texts[0]", "max_chunked_input_tokens")),
])
async def test_bad_long_input_requests_cohere(chunking: FakeApp, payload: dict[str, Any],
                                              words_in_message: Sequence[str]) -> None:
    response = await chunking.http.post("/v2/embed", json={"texts": [words(100)], **payload})
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"id", "message"} and all(w in body["message"] for w in words_in_message), body


async def test_a_1mb_input_holds_at_most_two_waves_in_flight() -> None:
    budget = 4096
    backend = FakeBackend(dimension=64, max_model_len=LIMIT, record_batches=False)
    async with fake_app(backend=backend, options={"long_inputs": "chunk", "max_batch_tokens": budget}) as app:
        engine = app.engine
        submit, in_flight, peak = engine.submit, [0], [0]

        async def counting(seqs: Sequence[Sequence[int]], deadline: float | None = None) -> Any:
            tokens = sum(len(ids) for ids in seqs)
            in_flight[0] += tokens
            peak[0] = max(peak[0], in_flight[0])
            try:
                return await submit(seqs, deadline)
            finally:
                in_flight[0] -= tokens

        engine.submit = counting  # type: ignore[method-assign]
        text = " ".join(f"w{i % 5000}" for i in range(200_000))  # 1.2 MB, 200,000 tokens
        assert len(text) > 1_000_000
        response = await app.http.post("/v1/embeddings", json={"input": text})
        assert response.status_code == 200, response.text
        windows = -(-200_000 // WIDTH)
        assert response.headers["X-Chunked-Inputs"] == f"0:{windows}"
        assert response.json()["usage"]["prompt_tokens"] == 200_000 + windows
        assert 0 < peak[0] <= WAVES_IN_FLIGHT * budget  # never the whole input's windows at once


async def test_a_text_longer_than_a_tokenisation_slice_is_chunked_from_its_slices() -> None:
    async with fake_app(options={"long_inputs": "chunk"}) as app:
        backend = app.engine.backend
        assert isinstance(backend, FakeBackend)
        text = words(9000)  # ~54K characters: four 16K-character slices
        response = await app.http.post("/v1/embeddings", json={"input": text})
        expected, windows, tokens = _reference(backend, text)
        np.testing.assert_allclose(_rows(response.json())[0], expected, atol=1e-6)
        assert response.json()["usage"]["prompt_tokens"] == tokens
        assert response.headers["X-Chunked-Inputs"] == f"0:{windows}"


@pytest.mark.parametrize("policy", ["server", "refuse", "truncate", "chunk"])
async def test_tokenize_shows_what_each_policy_feeds_the_model(chunking: FakeApp, policy: str) -> None:
    """/tokenize of an over-long text under each long_inputs policy (the server's: chunk here) against the
    embeddings' answer to the same request: refused alike; truncated: the cut ids; chunked: every id in one
    piece with the windows embedded. billed_tokens is the embeddings' usage in every case."""
    backend = chunking.engine.backend
    assert isinstance(backend, FakeBackend)
    long = words(150)
    field = {} if policy == "server" else {"long_inputs": policy}
    tokenized = await chunking.http.post("/tokenize", json={"prompt": long, **field})
    embedded = await chunking.http.post("/v1/embeddings", json={"input": long, **field})
    assert tokenized.status_code == embedded.status_code, tokenized.text
    if policy == "refuse":
        assert tokenized.status_code == 400 and tokenized.json()["error"] == embedded.json()["error"]
        return
    body, whole = tokenized.json(), backend.tokenize([long])[0]
    assert body["billed_tokens"] == embedded.json()["usage"]["prompt_tokens"] and body["count"] == len(body["tokens"])
    if policy == "truncate":
        assert body["tokens"] == [*whole[:LIMIT - 1], 2] and body["truncated"] and body["chunks"] == 1
        assert embedded.headers["X-Truncated-Inputs"] == "0" and body["billed_tokens"] == LIMIT
        return
    _, windows, tokens = _reference(backend, long)
    assert body["tokens"] == whole and not body["truncated"] and body["chunks"] == windows == 3
    assert embedded.headers["X-Chunked-Inputs"] == f"0:{windows}" and body["billed_tokens"] == tokens


async def test_tokenize_long_inputs_errors_are_the_embeddings_ones(chunking: FakeApp) -> None:
    for payload in ({"long_inputs": "split"}, {"long_inputs": 3}, {"long_inputs": "chunk", "truncate": True},
                    {"prompt": words(1001)}):
        response = await chunking.http.post("/tokenize", json={"prompt": words(100), **payload})
        assert response.status_code == 400 and response.json()["error"]["param"] in ("long_inputs", "input"), payload
    short = (await chunking.http.post("/tokenize", json={"prompt": "a few words"})).json()
    assert (short["truncated"], short["chunks"], short["billed_tokens"]) == (False, 1, short["count"])


def test_settings() -> None:
    with pytest.raises(ValidationError, match="contradict"):
        make_settings(truncate=True, long_inputs="chunk")
    assert engine_options(truncate=True).long_inputs == "truncate"
    assert engine_options(long_inputs="truncate").truncate  # rerankers read truncate
    assert not engine_options(long_inputs="chunk").truncate
