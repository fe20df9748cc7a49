"""Multi-vector (ColBERT) models: token vectors and MaxSim scores equal PyLate's (fp32, within 1e-5) through
the HTTP endpoints in-process (/v1/embeddings, /embed_all, /v1/rerank, /v2/rerank with Cohere's SDK,
/v1/score), and the refusals. PyLate runs in a venv of its own (it pins older sentence-transformers and
transformers): tests/data/colbert_reference.json holds its outputs, written by scripts/colbert_reference.py
on the fixture built here (testing.build_random_colbert; the digest of its tensors is checked first)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embedding_service.api.served import EMBED, MULTIVECTOR
from embedding_service.engine.multivector import MultiVectorEngine

from .conftest import backend_options, beside_a_fake_dense, engine_options, make_settings, task_found

pytest.importorskip("torch")

REFERENCE = json.loads((Path(__file__).parent / "data" / "colbert_reference.json").read_text())
QUERIES, DOCUMENTS = REFERENCE["queries"], REFERENCE["documents"]
EXACT = 1e-5  # fp32


def _close(ours: Any, theirs: Any) -> float:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max(initial=0.0))


async def _engine(model_dir: Path, **options: object) -> MultiVectorEngine:
    from embedding_service.backends.torch.multivector import TorchMultiVectorBackend

    backend = TorchMultiVectorBackend(backend_options(model_dir, model_label="colbert", dtype="float32",
                                                      device="cpu"))
    engine = MultiVectorEngine(backend, engine_options(**{"batch_timeout_ms": 2, "max_batch_size": 3, **options}),
                               max_documents=8)
    await engine.start()
    return engine


def test_the_fixture_is_the_model_pylate_encoded(colbert_dir: Path) -> None:
    from testkit.random_models import tensor_digest

    assert tensor_digest(colbert_dir) == REFERENCE["tensor_digest"], (
        "the fixture's weights changed: rerun scripts/colbert_reference.py")


@pytest.fixture
async def http(colbert_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    colbert = await _engine(colbert_dir, max_inputs_per_request=8, max_token_vectors_bytes=16 * 1024)
    async with beside_a_fake_dense("colbert", colbert, MULTIVECTOR) as client:
        yield client


async def _post(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Any:
    answer = await http.post(path, json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.mark.parametrize("side", ["is_query", "input_type"])
async def test_token_vectors_equal_pylate(http: httpx.AsyncClient, side: str) -> None:
    """Queries (marker, mask-token expansion, truncation) and documents (marker, skip-list), several per
    batch beside longer ones, as ColBERT.encode(is_query=True / False) gives them."""
    for texts, query, expected in ((QUERIES, True, REFERENCE["query_vectors"]),
                                   (DOCUMENTS, False, REFERENCE["document_vectors"])):
        chosen = {"is_query": query} if side == "is_query" else {
            "input_type": "search_query" if query else "search_document"}
        openai = await _post(http, "/v1/embeddings", {"input": texts, "model": "colbert", "truncate": True, **chosen})
        tei = await _post(http, "/embed_all", {"inputs": texts, "truncate": True, **chosen})
        assert openai["model"] == "colbert" and openai["usage"]["prompt_tokens"] > 0
        for item, matrix, theirs in zip(openai["data"], tei, expected, strict=True):
            assert item["object"] == "token_embeddings" and item["shape"] == list(np.shape(theirs))
            assert _close(item["embedding"], theirs) <= EXACT
            assert _close(matrix, theirs) <= EXACT


async def test_a_query_by_default_as_pylate(http: httpx.AsyncClient) -> None:
    plain = await _post(http, "/embed_all", {"inputs": QUERIES[0]})
    assert _close(plain[0], REFERENCE["query_vectors"][0]) <= EXACT
    assert np.shape(plain[0])[0] == len(REFERENCE["query_vectors"][0])  # expanded to query_length


@pytest.mark.parametrize(("dtype", "numpy_type", "within"), [("float32", "<f4", EXACT), ("float16", "<f2", 1e-3)])
async def test_base64_matrices_with_their_shape(http: httpx.AsyncClient, dtype: str, numpy_type: str,
                                                within: float) -> None:
    body = {"input": DOCUMENTS[:2], "model": "colbert", "is_query": False, "encoding_format": "base64",
            **({"dtype": dtype} if dtype == "float16" else {})}
    for item, theirs in zip((await _post(http, "/v1/embeddings", body))["data"], REFERENCE["document_vectors"],
                            strict=False):
        assert item["dtype"] == dtype
        matrix = np.frombuffer(base64.b64decode(item["embedding"]), dtype=numpy_type).reshape(item["shape"])
        assert _close(matrix, theirs) <= within


async def test_maxsim_scores_equal_pylate(http: httpx.AsyncClient) -> None:
    """/v1/rerank, /v2/rerank (Cohere's SDK, unchanged) and /v1/score score by MaxSim as
    pylate.scores.colbert_scores does."""
    cohere = pytest.importorskip("cohere")
    client = cohere.AsyncClientV2(api_key="unused", base_url="http://test", httpx_client=http)
    for query, expected in zip(QUERIES, REFERENCE["scores"], strict=True):
        v1 = await _post(http, "/v1/rerank", {"query": query, "documents": DOCUMENTS, "truncate": True})
        assert v1["model"] == "colbert"  # the default reranker: no cross-encoder is served
        by_index = {r["index"]: r["relevance_score"] for r in v1["results"]}
        assert _close([by_index[i] for i in range(len(DOCUMENTS))], expected) <= EXACT
        assert [r["index"] for r in v1["results"]] == list(np.argsort(expected)[::-1])
        score = await _post(http, "/v1/score", {"text_1": query, "text_2": DOCUMENTS, "truncate": True})
        assert _close([d["score"] for d in sorted(score["data"], key=lambda d: d["index"])], expected) <= EXACT
        if len(query.split()) < 10:  # (Cohere's SDK sends no truncate: the short queries)
            sdk = await client.rerank(model="colbert", query=query, documents=DOCUMENTS[:4], top_n=2)
            assert [r.index for r in sdk.results] == list(np.argsort(expected[:4])[::-1][:2])
            assert _close([r.relevance_score for r in sdk.results], sorted(expected[:4])[::-1][:2]) <= EXACT


@pytest.mark.parametrize(("path", "body", "status", "param", "words"), [
    ("/embed_all", {}, 400, "inputs", "'inputs' is required"),
    ("/embed_all", {"inputs": []}, 400, "inputs", "empty list"),
    ("/embed_all", {"inputs": ""}, 400, "inputs", "empty string"),
    ("/embed_all", {"inputs": ["a"] * 9}, 400, "input", "too many inputs: 9"),
    ("/embed_all", {"inputs": "word " * 20}, 400, "input", "more than this model's limit of 15"),
    ("/embed_all", {"inputs": "word " * 50, "is_query": False}, 400, "input", "limit of 47"),
    ("/embed_all", {"inputs": "a", "model": "dense"}, 400, "model", "not a multi-vector (ColBERT) model"),
    ("/embed_all", {"inputs": "a", "is_query": "yes"}, 400, "is_query", "valid boolean"),
    ("/embed_all", {"inputs": "a", "is_query": True, "input_type": "search_document"}, 400, "is_query",
     "contradicts"),
    ("/embed_all", {"inputs": ["word " * 30] * 8, "is_query": False}, 413, "input", "max_token_vectors_bytes"),
    ("/v1/embeddings", {"input": "a", "model": "colbert", "encoding_format": "int8"}, 400, "encoding_format",
     "float (JSON) or base64"),
    ("/v1/embeddings", {"input": "a", "model": "colbert", "dtype": "float16"}, 400, "dtype", "base64"),
    ("/v1/embeddings", {"input": "a", "model": "colbert", "dtype": "int4"}, 400, "dtype", "float32 or float16"),
    ("/v1/embeddings", {"input": "a", "model": "colbert", "dimensions": 8}, 400, "dimensions", "does not apply"),
    ("/v1/embeddings", {"input": "a", "model": "colbert", "instruction": "x"}, 400, "instruction", "does not apply"),
    ("/v1/embeddings", {"input": "a", "model": "colbert", "input_type": "clustering"}, 400, "input_type",
     "queries or documents"),
    ("/v1/embeddings", {"input": ["word " * 30] * 8, "model": "colbert", "is_query": False}, 413, "input",
     "max_token_vectors_bytes"),
    ("/v1/embed", {"texts": ["a"], "model": "colbert", "input_type": "search_document"}, 400, None,
     "it cannot embed here. Use /v1/embeddings, /embed_all"),  # (Cohere's envelope)
    ("/tokenize", {"prompt": "a", "model": "colbert"}, 400, "model", "multi-vector (ColBERT) model"),
    ("/embed_sparse", {"inputs": "a", "model": "colbert"}, 400, "model", "not a sparse model"),
    ("/v1/rerank", {"query": "a", "documents": ["b"] * 9}, 400, "documents", "too many documents: 9"),
    ("/v1/rerank", {"query": "word " * 20, "documents": ["b"]}, 400, "input", "limit of 15"),
    ("/v1/rerank", {"query": "a", "documents": ["b"], "instruction": "x"}, 400, "instruction", "does not apply"),
    ("/v1/rerank", {"query": "a", "documents": ["b"], "model": "dense"}, 400, "model", "cannot rerank"),
])
async def test_bad_multivector_requests_are_clear(http: httpx.AsyncClient, path: str, body: dict[str, Any],
                                                  status: int, param: str | None, words: str) -> None:
    answer = await http.post(path, json=body)
    assert answer.status_code == status, answer.text[:300]
    error = answer.json()["error"] if param is not None else answer.json()
    assert error.get("param") == param and words in error["message"], error


async def test_models_list_the_task(http: httpx.AsyncClient) -> None:
    cards = {card["id"]: card for card in (await http.get("/v1/models")).json()["data"]}
    assert cards["colbert"]["task"] == "multivector" and cards["dense"]["task"] == "embed"


def test_a_pylate_folder_is_found_multivector_planned_on_torch_and_never_served_dense(tmp_path: Path,
                                                                                      colbert_dir: Path) -> None:
    from embedding_service.backends import BackendLoadError
    from embedding_service.service import build_engine, plan_model

    assert task_found(tmp_path, colbert_dir) == MULTIVECTOR
    planned = plan_model(make_settings(model_path=str(colbert_dir)), MULTIVECTOR)
    assert planned.engine == "torch" and isinstance(build_engine(planned), MultiVectorEngine)
    for engine in ("vllm", "openvino"):
        with pytest.raises(BackendLoadError, match=f"the {engine} engine cannot serve a multi-vector"):
            build_engine(plan_model(make_settings(model_path=str(colbert_dir), engine=engine), MULTIVECTOR))
    with pytest.raises(BackendLoadError, match="is a multi-vector \\(ColBERT, PyLate\\) model"):
        plan_model(make_settings(model_path=str(colbert_dir)), EMBED)


async def test_a_folder_without_its_markers_is_refused(tmp_path: Path, colbert_dir: Path) -> None:
    """PyLate would add a missing [Q]/[D] with a random embedding row: vectors nobody can reproduce."""
    import shutil

    from embedding_service.backends import BackendLoadError
    from embedding_service.backends.torch.multivector import TorchMultiVectorBackend

    folder = tmp_path / "colbert"
    shutil.copytree(colbert_dir, folder)
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    (folder / "config_sentence_transformers.json").write_text(json.dumps({**config, "query_prefix": "[QUERY] "}))
    with pytest.raises(BackendLoadError, match="marker '\\[QUERY\\] ' is not in the tokenizer"):
        TorchMultiVectorBackend(backend_options(folder, dtype="float32", device="cpu")).load()
