"""A real server with a models file serving the demo MiniLM (dense), SPLADE-tiny (sparse) and a random ColBERT
(multi-vector): /embed_sparse and /v1/embeddings give SparseEncoder.encode's vectors (same indices, values
within 1e-4, fp32), the ColBERT's token vectors and MaxSim scores are PyLate's (Cohere's SDK reranks with it),
and the dense model's answers are bit for bit those of a `--demo` server without the others beside it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from .conftest import ServerProcess, serving

pytestmark = pytest.mark.slow

pytest.importorskip("sentence_transformers")

TEXTS = ["what is splade?", "SPLADE expands a text over the vocabulary and weights each term.",
         "Learned sparse retrieval keeps an inverted index, like BM25. " * 6, "café 東京"]
TORCH_FP32 = ["--engine", "torch", "--dtype", "float32", "--device", "cpu", "--log-level", "WARNING"]


def _served(args: list[str]) -> Iterator[ServerProcess]:
    return serving([*TORCH_FP32, *args])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, splade_tiny_dir: Path, inference_free_dir: Path,
           colbert_dir: Path) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("models") / "models.yaml"
    path.write_text(f"""models:
  - name: minilm
    demo: true
  - name: splade
    aliases: [splade-tiny]
    model_path: {splade_tiny_dir}
    task: sparse
  - name: inference-free
    model_path: {inference_free_dir}
  - name: colbert
    model_path: {colbert_dir}
""")  # (no task: a saved SparseEncoder is found sparse, a PyLate folder multivector)
    yield from _served(["--models-file", str(path), "--data-dir", str(tmp_path_factory.mktemp("batch-data"))])


def _post(url: str, path: str, body: dict[str, Any]) -> Any:
    response = httpx.post(url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_sparse_vectors_equal_sparse_encoder(server: ServerProcess, splade_tiny_dir: Path) -> None:
    from sentence_transformers import SparseEncoder

    reference = SparseEncoder(str(splade_tiny_dir), device="cpu")
    rows = reference.encode(TEXTS, convert_to_tensor=True).to_dense().numpy()
    tei = _post(server.url, "/embed_sparse", {"inputs": TEXTS})
    openai = _post(server.url, "/v1/embeddings", {"input": TEXTS, "model": "splade-tiny"})
    assert openai["model"] == "splade"
    worst = 0.0
    for items, item, row in zip(tei, openai["data"], rows, strict=True):
        expected = np.flatnonzero(row)
        assert [i["index"] for i in items] == expected.tolist() == item["embedding"]["indices"]
        values = np.array([i["value"] for i in items])
        assert values.tolist() == item["embedding"]["values"]
        worst = max(worst, float(np.abs(values - row[expected]).max()))
    assert worst <= 1e-4
    assert len({len(items) for items in tei}) > 1  # the vectors differ from text to text
    # return_tokens: each entry's vocabulary string, as SparseEncoder.decode names it.
    named = _post(server.url, "/embed_sparse", {"inputs": TEXTS, "return_tokens": True})
    named_openai = _post(server.url, "/v1/embeddings", {"input": TEXTS, "model": "splade", "return_tokens": True})
    for items, item, decoded in zip(named, named_openai["data"], reference.decode(
            reference.encode(TEXTS, convert_to_tensor=True)), strict=True):
        assert {i["token"]: i["index"] for i in items}.keys() == {token for token, _ in decoded}
        assert item["embedding"]["tokens"] == [i["token"] for i in items]
    assert "sp" in {i["token"] for i in named[0]}  # "splade" -> sp ##lad ##e
    pruned = _post(server.url, "/embed_sparse", {"inputs": TEXTS[1], "top_k": 4})
    top = reference.encode([TEXTS[1]], max_active_dims=4, convert_to_tensor=True).to_dense().numpy()[0]
    assert [i["index"] for i in pruned[0]] == np.flatnonzero(top).tolist()


def test_inference_free_model_query_and_document_sides(server: ServerProcess, inference_free_dir: Path) -> None:
    from sentence_transformers import SparseEncoder

    reference = SparseEncoder(str(inference_free_dir), device="cpu")
    for input_type, rows in (("search_query", reference.encode_query(TEXTS, convert_to_tensor=True)),
                             ("search_document", reference.encode_document(TEXTS, convert_to_tensor=True))):
        dense = rows.to_dense().numpy()
        tei = _post(server.url, "/embed_sparse", {"inputs": TEXTS, "model": "inference-free",
                                                  "input_type": input_type})
        openai = _post(server.url, "/v1/embeddings", {"input": TEXTS, "model": "inference-free",
                                                      "input_type": input_type})
        for items, item, row in zip(tei, openai["data"], dense, strict=True):
            expected = np.flatnonzero(row)
            assert [i["index"] for i in items] == expected.tolist() == item["embedding"]["indices"]
            assert np.abs(np.array(item["embedding"]["values"]) - row[expected]).max() <= 1e-4


def test_dense_model_unchanged_beside_the_sparse_one(server: ServerProcess) -> None:
    body = {"input": TEXTS, "model": "minilm"}
    beside = np.asarray([item["embedding"] for item in _post(server.url, "/v1/embeddings", body)["data"]])
    default = np.asarray([item["embedding"] for item in _post(server.url, "/v1/embeddings", {"input": TEXTS})["data"]])
    assert beside.shape == (len(TEXTS), 384)
    np.testing.assert_array_equal(default, beside)  # no `model`: the dense one, not the sparse one
    for alone in _served(["--demo"]):
        np.testing.assert_array_equal(
            np.asarray([item["embedding"] for item in _post(alone.url, "/v1/embeddings", body)["data"]]), beside)
        refused = httpx.post(alone.url + "/embed_sparse", json={"inputs": "x"}, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_sparse"
    models = {card["id"]: card for card in httpx.get(server.url + "/v1/models").json()["data"]}
    assert models["splade"]["task"] == "sparse" and models["minilm"]["dimensions"] == 384
    health = httpx.get(server.url + "/health").json()
    assert {m["model"]: m["task"] for m in health["models"]} == {"minilm": "embed", "splade": "sparse",
                                                                "inference-free": "sparse", "colbert": "multivector"}


def test_colbert_beside_them_equals_pylate(server: ServerProcess) -> None:
    """Token vectors and MaxSim scores as PyLate computes them (tests/data/colbert_reference.json), the scores
    through Cohere's (sync) SDK unchanged: the ColBERT is the default reranker here (no cross-encoder)."""
    cohere = pytest.importorskip("cohere")
    reference = json.loads((Path(__file__).parent / "data" / "colbert_reference.json").read_text())
    queries, documents = reference["queries"][:3], reference["documents"]
    openai = _post(server.url, "/v1/embeddings", {"input": queries, "model": "colbert", "input_type": "search_query"})
    for item, theirs in zip(openai["data"], reference["query_vectors"], strict=False):
        assert np.abs(np.asarray(item["embedding"]) - np.asarray(theirs)).max() <= 1e-5
    client = cohere.ClientV2(api_key="unused", base_url=server.url)
    for query, expected in zip(queries, reference["scores"], strict=False):
        # max_tokens_per_doc: Cohere's cut (the long document goes past the model's document_length)
        answer = client.rerank(model="rerank-v3.5", query=query, documents=documents, max_tokens_per_doc=4096)
        assert [r.index for r in answer.results] == list(np.argsort(expected)[::-1])
        ours = sorted((r.index, r.relevance_score) for r in answer.results)
        assert np.abs(np.asarray([score for _, score in ours]) - np.asarray(expected)).max() <= 1e-5


def test_sparse_lines_run_in_the_batch_api(server: ServerProcess) -> None:
    """A batch with endpoint /embed_sparse: each output body is the online endpoint's answer to that body (the
    route and its envelope; the vectors themselves are checked against SparseEncoder above), a bad line the
    online 4xx."""
    bodies = {"one": {"inputs": TEXTS[0], "model": "splade"}, "two": {"inputs": TEXTS[1:3], "top_k": 4},
              "bad": {"inputs": [], "model": "splade"}}
    content = "".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/embed_sparse", "body": body}) + "\n"
                      for cid, body in bodies.items()).encode()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        uploaded = client.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"})
        assert uploaded.status_code == 200, uploaded.text
        batch = client.post("/v1/batches", json={"input_file_id": uploaded.json()["id"], "endpoint": "/embed_sparse",
                                                 "completion_window": "24h"}).json()
        for _ in range(600):
            batch = client.get(f"/v1/batches/{batch['id']}").json()
            if batch["status"] in ("completed", "failed", "expired", "cancelled"):
                break
            time.sleep(0.1)
        assert batch["status"] == "completed", batch
        assert batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
        lines = [json.loads(line) for file in ("output_file_id", "error_file_id")
                 for line in client.get(f"/v1/files/{batch[file]}/content").text.splitlines()]
        assert sorted(line["custom_id"] for line in lines) == ["bad", "one", "two"]
        for line in lines:
            online = client.post("/embed_sparse", json=bodies[line["custom_id"]])
            assert (line["response"]["status_code"], line["response"]["body"]) == (online.status_code, online.json())
