"""Sparse (SPLADE) vectors: the engine's equal sentence-transformers' SparseEncoder.encode (same non-zero
indices, values within 1e-4 in fp32) on the real SPLADE-tiny model and a random masked-LM, for queries and
documents; and the API's shapes and refusals, in-process (test_sparse_server.py runs a real server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embedding_service.api.app import create_app
from embedding_service.api.served import EMBED, SPARSE, Served
from embedding_service.backends.sparse import SparseVector, top_k
from embedding_service.engine.sparse import SparseEngine
from embedding_service.engine.types import EmbedRequest
from embedding_service.errors import ServiceError

from .conftest import backend_options, beside_a_fake_dense, engine_options, in_process_client, make_settings, task_found

pytest.importorskip("torch")
pytest.importorskip("sentence_transformers")

QUERIES = ["what is splade?", "how do sparse retrievers rank documents", "BM25 vs. learned sparse", "café"]
DOCUMENTS = [
    "SPLADE is a sparse lexical model: it expands a text over the BERT vocabulary and weights each term.",
    "Learned sparse retrieval keeps an inverted index, like BM25, with weights learned by a masked language model.",
    "The cat sat on the mat. Ünïcödé façade — 東京タワー 😀",
    "A short one.",
    " ".join(f"term{i} retrieval index query" for i in range(40)),  # longer: padding beside short texts
]


def _reference(model_dir: Path) -> Any:
    from sentence_transformers import SparseEncoder

    return SparseEncoder(str(model_dir), device="cpu")


def _dense(rows: Any) -> np.ndarray:
    return rows.to_dense().cpu().numpy() if rows.is_sparse else rows.cpu().numpy()


def _compare(ours: list[SparseVector], reference: np.ndarray) -> float:
    """Same non-zero indices, sorted; the largest value difference."""
    worst = 0.0
    assert len(ours) == len(reference)
    for vector, row in zip(ours, reference, strict=True):
        expected = np.flatnonzero(row)
        assert vector.indices.dtype == np.int32 and vector.values.dtype == np.float32
        assert np.array_equal(vector.indices, expected), "the non-zero indices differ from SparseEncoder's"
        worst = max(worst, float(np.abs(vector.values - row[expected]).max(initial=0.0)))
    return worst


async def _engine(model_dir: Path, **options: object) -> SparseEngine:
    from embedding_service.backends.torch.sparse import TorchSparseBackend

    backend = TorchSparseBackend(backend_options(model_dir, model_label="splade", dtype="float32", device="cpu"))
    engine = SparseEngine(backend, engine_options(**{"batch_timeout_ms": 2, **options}))
    await engine.start()
    return engine


@pytest.fixture(params=["splade_tiny_dir", "random_splade_dir"])
def splade_dir(request: pytest.FixtureRequest) -> Path:
    return Path(request.getfixturevalue(request.param))


async def test_vectors_equal_sparse_encoder(splade_dir: Path) -> None:
    reference = _reference(splade_dir)
    # Small batches: the texts are split over several, each padded to its own longest text.
    engine = await _engine(splade_dir, max_batch_size=3)
    try:
        queries = await engine.encode(EmbedRequest(texts=QUERIES))
        documents = await engine.encode(EmbedRequest(texts=DOCUMENTS))
        tokens = sum(len(ids) for ids in engine.backend.tokenize(QUERIES))
    finally:
        await engine.stop()
    worst = max(_compare(queries.vectors, _dense(reference.encode_query(QUERIES, convert_to_tensor=True))),
                _compare(documents.vectors, _dense(reference.encode_document(DOCUMENTS, convert_to_tensor=True))),
                _compare(queries.vectors, _dense(reference.encode(QUERIES, convert_to_tensor=True))))
    assert worst <= 1e-4
    # Honest: the vectors differ from text to text, and are sparse.
    sizes = [len(v.indices) for v in documents.vectors]
    assert min(sizes) > 0 and max(sizes) < engine.info.dimension / 2  # type: ignore[union-attr]
    first, second = documents.vectors[0], documents.vectors[1]
    assert not np.array_equal(first.indices, second.indices)
    assert queries.prompt_tokens == tokens


async def test_top_k_and_truncation_equal_sparse_encoder(splade_dir: Path) -> None:
    reference = _reference(splade_dir)
    engine = await _engine(splade_dir)
    long_text = " ".join(["sparse retrieval with learned term weights"] * 200)  # well over 512 tokens
    try:
        pruned = await engine.encode(EmbedRequest(texts=DOCUMENTS), top_k=5)
        cut = await engine.encode(EmbedRequest(texts=[long_text], truncate=True))
        with pytest.raises(ServiceError) as refused:
            await engine.encode(EmbedRequest(texts=[long_text], truncate=False))
        with pytest.raises(ServiceError, match="'dimensions' does not apply"):
            await engine.encode(EmbedRequest(texts=["x"], dimensions=8))
    finally:
        await engine.stop()
    assert refused.value.code == "context_length_exceeded"
    assert all(len(v.indices) == 5 for v in pruned.vectors)
    assert _compare(pruned.vectors, _dense(reference.encode(DOCUMENTS, max_active_dims=5, convert_to_tensor=True))
                    ) <= 1e-4
    assert _compare(cut.vectors, _dense(reference.encode([long_text], convert_to_tensor=True))) <= 1e-4


def test_top_k_keeps_the_largest_sorted_by_index() -> None:
    vector = SparseVector(np.array([3, 7, 9, 20], dtype=np.int32), np.array([0.5, 2.0, 0.1, 1.0], dtype=np.float32))
    kept = top_k(vector, 2)
    assert kept.indices.tolist() == [7, 20] and kept.values.tolist() == [2.0, 1.0]
    assert top_k(vector, 10) is vector and top_k(vector, None) is vector


# --- the API, in-process: a fake dense model beside the random SPLADE one --------------------------------

@pytest.fixture
async def http(random_splade_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    sparse = await _engine(random_splade_dir, max_inputs_per_request=8)
    async with beside_a_fake_dense("splade", sparse, SPARSE) as client:
        yield client


async def test_embed_sparse_and_openai_shapes(http: httpx.AsyncClient, random_splade_dir: Path) -> None:
    reference = _dense(_reference(random_splade_dir).encode(DOCUMENTS[:2], convert_to_tensor=True))
    answer = await http.post("/embed_sparse", json={"inputs": DOCUMENTS[:2]})
    assert answer.status_code == 200, answer.text
    tei = answer.json()
    for items, row in zip(tei, reference, strict=True):
        assert [item["index"] for item in items] == np.flatnonzero(row).tolist()
        assert np.abs(np.array([item["value"] for item in items]) - row[np.flatnonzero(row)]).max() <= 1e-4
    one = (await http.post("/embed_sparse", json={"inputs": DOCUMENTS[0], "top_k": 3})).json()
    assert len(one) == 1 and len(one[0]) == 3
    openai = (await http.post("/v1/embeddings", json={"input": DOCUMENTS[:2], "model": "splade"})).json()
    assert openai["model"] == "splade" and openai["usage"]["prompt_tokens"] > 0
    for item, items in zip(openai["data"], tei, strict=True):
        assert item["object"] == "sparse_embedding"
        assert item["embedding"] == {"indices": [i["index"] for i in items], "values": [i["value"] for i in items]}
    pruned = (await http.post("/v1/embeddings", json={"input": "x y z", "model": "splade", "top_k": 2})).json()
    assert len(pruned["data"][0]["embedding"]["indices"]) <= 2
    dense = (await http.post("/v1/embeddings", json={"input": "x"})).json()  # the default: the dense model
    assert dense["model"] == "dense" and len(dense["data"][0]["embedding"]) == 64
    cards = {card["id"]: card for card in (await http.get("/v1/models")).json()["data"]}
    assert cards["splade"]["task"] == "sparse"


async def test_cohere_embed_refuses_a_sparse_model(http: httpx.AsyncClient) -> None:
    answer = await http.post("/v1/embed", json={"texts": ["a"], "model": "splade", "input_type": "search_document"})
    assert answer.status_code == 400, answer.text
    assert "a sparse model (task: sparse); it cannot embed here. Use /embed_sparse" in answer.text


@pytest.mark.parametrize(("path", "body", "param", "words"), [
    ("/embed_sparse", {}, "inputs", "'inputs' is required"),
    ("/embed_sparse", {"inputs": []}, "inputs", "empty list"),
    ("/embed_sparse", {"inputs": {"a": 1}}, "inputs", "a text or a list of texts, got dict"),
    ("/embed_sparse", {"inputs": ""}, "inputs", "empty string"),
    ("/embed_sparse", {"inputs": ["a", 3]}, "inputs", "text only"),
    ("/embed_sparse", {"inputs": ["a"] * 9}, "input", "too many inputs: 9"),
    ("/embed_sparse", {"inputs": "a", "top_k": 0}, "top_k", "greater than or equal to 1"),
    ("/embed_sparse", {"inputs": "a", "truncation_direction": "left"}, "truncation_direction", "right"),
    ("/embed_sparse", {"inputs": "a " * 600}, "input", "more than this model's limit"),
    ("/embed_sparse", {"inputs": "a", "model": "dense"}, "model", "not a sparse model"),
    ("/v1/embeddings", {"input": "a", "model": "splade", "encoding_format": "base64"}, "encoding_format", "float"),
    ("/v1/embeddings", {"input": "a", "model": "splade", "dimensions": 8}, "dimensions", "does not apply"),
    ("/v1/embeddings", {"input": "a", "model": "splade", "top_k": -1}, "top_k", "positive integer"),
    ("/v1/embeddings", {"input": "a", "model": "splade", "return_tokens": "yes"}, "return_tokens", "true or false"),
    ("/embed_sparse", {"inputs": "a", "return_tokens": 1}, "return_tokens", "valid boolean"),
    ("/v1/rerank", {"query": "a", "documents": ["b"], "model": "splade"}, "model", "a sparse model (task: sparse)"),
    ("/v1/score", {"text_1": "a", "text_2": "b", "model": "splade"}, "model", "cannot score"),
    ("/tokenize", {"prompt": "a", "model": "splade"}, "model", "a sparse model (task: sparse)"),
])
async def test_bad_sparse_requests_are_clear_400s(http: httpx.AsyncClient, path: str, body: dict[str, Any],
                                                  param: str, words: str) -> None:
    answer = await http.post(path, json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and words in error["message"], error


@pytest.mark.parametrize(("strategy", "activation"), [("sum", "relu"), ("max", "log1p_relu")])
async def test_a_saved_sparse_encoder_folder_keeps_its_pooling(tmp_path: Path, random_splade_dir: Path,
                                                               strategy: str, activation: str) -> None:
    """A sentence-transformers folder (modules.json + SpladePooling's config) is served with its pooling."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    built = SparseEncoder(modules=[Transformer(str(random_splade_dir), transformer_task="fill-mask"),
                                   SpladePooling(pooling_strategy=strategy, activation_function=activation)],
                          device="cpu")
    built.save(str(tmp_path))
    reference = SparseEncoder(str(tmp_path), device="cpu")
    engine = await _engine(tmp_path, max_batch_size=2)
    try:
        result = await engine.encode(EmbedRequest(texts=DOCUMENTS))
    finally:
        await engine.stop()
    assert _compare(result.vectors, _dense(reference.encode(DOCUMENTS, convert_to_tensor=True))) <= 1e-4


async def test_inference_free_query_side_equals_sparse_encoder(inference_free_dir: Path) -> None:
    reference = _reference(inference_free_dir)
    engine = await _engine(inference_free_dir, max_batch_size=2)
    try:
        queries = await engine.encode(EmbedRequest(texts=QUERIES + DOCUMENTS[:1]), side="query")
        documents = await engine.encode(EmbedRequest(texts=DOCUMENTS), side="document")
        plain = await engine.encode(EmbedRequest(texts=DOCUMENTS))
        as_document = await engine.encode(EmbedRequest(texts=QUERIES), side="document")
        with pytest.raises(ServiceError, match="side must be"):
            await engine.encode(EmbedRequest(texts=["x"]), side="passage")
    finally:
        await engine.stop()
    assert _compare(queries.vectors, _dense(reference.encode_query(QUERIES + DOCUMENTS[:1], convert_to_tensor=True))
                    ) <= 1e-4
    assert _compare(documents.vectors, _dense(reference.encode_document(DOCUMENTS, convert_to_tensor=True))) <= 1e-4
    assert _compare(plain.vectors, _dense(reference.encode(DOCUMENTS, convert_to_tensor=True))) <= 1e-4
    # The two sides really differ: a query's vector has only its own tokens; the document side expands.
    for by_query, by_document in zip(queries.vectors, as_document.vectors, strict=False):
        assert len(by_query.indices) < len(by_document.indices)
    assert queries.compute_time_s == 0.0  # no forward for the query side


async def test_input_type_over_http(inference_free_dir: Path) -> None:
    reference = _reference(inference_free_dir)
    sparse = await _engine(inference_free_dir)
    app = create_app(make_settings(engine="fake"), models=[Served("splade", sparse, SPARSE)])
    try:
        async with in_process_client(app) as client:
            tei = (await client.post("/embed_sparse", json={"inputs": QUERIES, "input_type": "search_query"})).json()
            openai = (await client.post("/v1/embeddings", json={"input": QUERIES, "input_type": "search_query"})).json()
            bad = await client.post("/embed_sparse", json={"inputs": "x", "input_type": "passage"})
            bad_openai = await client.post("/v1/embeddings", json={"input": "x", "input_type": "passage"})
    finally:
        await sparse.stop()
    rows = _dense(reference.encode_query(QUERIES, convert_to_tensor=True))
    for items, item, row in zip(tei, openai["data"], rows, strict=True):
        assert [i["index"] for i in items] == np.flatnonzero(row).tolist() == item["embedding"]["indices"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input_type"
    assert bad_openai.status_code == 400 and bad_openai.json()["error"]["param"] == "input_type"


def test_a_sparse_model_is_planned_on_torch_and_refused_by_openvino(random_splade_dir: Path) -> None:
    from embedding_service.backends import BackendLoadError
    from embedding_service.service import build_engine, plan_model

    planned = plan_model(make_settings(model_path=str(random_splade_dir), served_model_name="splade"), SPARSE)
    assert planned.role == SPARSE and planned.engine == "torch" and planned.name == "splade"
    assert isinstance(build_engine(planned), SparseEngine)
    openvino = plan_model(make_settings(model_path=str(random_splade_dir), engine="openvino"), SPARSE)
    with pytest.raises(BackendLoadError, match="the openvino engine cannot serve a sparse"):
        build_engine(openvino)
    # engine: vllm builds vLLM's (test_vllm_sparse.py loads it; what it refuses, it refuses at load)
    vllm = plan_model(make_settings(model_path=str(random_splade_dir), engine="vllm"), SPARSE)
    assert vllm.engine == "vllm" and type(build_engine(vllm).sparse_backend).__name__ == "VllmSparseBackend"


def test_a_saved_sparse_encoder_is_found_sparse_and_never_served_dense(tmp_path: Path,
                                                                       inference_free_dir: Path) -> None:
    from embedding_service.backends import BackendLoadError
    from embedding_service.service import plan_model

    assert task_found(tmp_path, inference_free_dir) == SPARSE  # no task: found
    with pytest.raises(BackendLoadError, match="is a sparse \\(SPLADE\\) model"):
        plan_model(make_settings(model_path=str(inference_free_dir)), EMBED)


def test_what_vllm_would_serve_differently_is_named(random_splade_dir: Path) -> None:
    """vLLM's SPLADE model is a BERT masked-LM with max/relu pooling and the head under transformers' names:
    anything else gets a reason (test_vllm_sparse.py loads the one it serves and refuses SPLADE-tiny)."""
    from dataclasses import replace

    from embedding_service.backends.model.facts import read_model_facts
    from embedding_service.backends.sparse import SpladeConfig, sparse_layout
    from embedding_service.backends.vllm.sparse import splade_refusal

    facts = read_model_facts(random_splade_dir)
    layout = sparse_layout(facts)
    assert splade_refusal(facts, layout) is None
    assert "max/relu only" in str(splade_refusal(facts, replace(layout, splade=SpladeConfig("sum"))))
    assert "max/relu only" in str(splade_refusal(facts, replace(layout, splade=SpladeConfig("max", "log1p_relu"))))
    assert "is a BERT masked-LM" in str(splade_refusal(replace(facts, model_type="distilbert"), layout))
