"""`embedding-service embed` with a sparse (SPLADE) or multi-vector (ColBERT) model in this process: the
parquet columns (`list<struct<index, value>>`, `list<list<float32>>`) and jsonl shapes read back equal to the
online /v1/embeddings answers of the same model; Qdrant upserts the sparse column as SparseVector; an
interrupted job resumes to the same bytes; what does not apply to these vectors is refused in one line."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedding_service.api.served import MULTIVECTOR, SPARSE
from embedding_service.cli import main

from .conftest import beside_a_fake_dense
from .test_multivector import _engine as colbert_engine
from .test_sparse import _engine as sparse_engine

pytest.importorskip("torch")

TORCH = ["--engine", "torch", "--dtype", "float32", "--device", "cpu", "--log-level", "WARNING"]
# Several chunks (5 rows each) and batches of texts of different lengths, one long enough to be cut.
TEXTS = [f"document {i} about {'sparse and late interaction retrieval ' * (i % 5)}things" for i in range(12)]
CLOSE = 1e-5  # fp32; bulk's batches are not the online ones (padding moves the last bits)


def _write_input(tmp_path: Path) -> Path:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps({"id": f"d{i}", "text": t}) + b"\n" for i, t in enumerate(TEXTS)))
    return source


def _embed(model_dir: Path, source: Path, output: Path, *extra: str) -> int:
    return main(["embed", str(source), "-o", str(output), "--model-path", str(model_dir), "--id-column", "id",
                 "--chunk-rows", "5", "--max-batch-size", "3", "--truncate", *TORCH, *extra])


def _online(name: str, start: Callable[[Path], Awaitable[Any]], model_dir: Path, task: str,
            body: dict[str, Any]) -> list[Any]:
    """The /v1/embeddings answer of the model in `model_dir`, served in-process (the tests are not async:
    the CLI runs its own event loop)."""
    async def ask() -> Any:
        async with beside_a_fake_dense(name, await start(model_dir), task) as http:
            return await http.post("/v1/embeddings",
                                   json={"model": name, "input": TEXTS, "truncate": True, **body})

    answer = asyncio.run(ask())
    assert answer.status_code == 200, answer.text
    return [item["embedding"] for item in answer.json()["data"]]


def _assert_sparse_equal(ours: list[dict[str, Any]], online: list[dict[str, Any]]) -> None:
    for mine, theirs in zip(ours, online, strict=True):
        assert list(mine["indices"]) == theirs["indices"]
        np.testing.assert_allclose(np.asarray(mine["values"], np.float32), theirs["values"], atol=CLOSE, rtol=0)


@pytest.mark.parametrize(("model", "side", "extra"), [
    ("random_splade_dir", "search_document", ["--task", "sparse"]),  # a bare BertForMaskedLM folder: told
    ("inference_free_dir", "search_query", []),  # a SparseEncoder folder (found); its query side is a lookup
])
def test_sparse_parquet_and_jsonl_equal_the_online_vectors(tmp_path: Path, request: pytest.FixtureRequest,
                                                            model: str, side: str, extra: list[str]) -> None:
    model_dir = Path(request.getfixturevalue(model))
    source = _write_input(tmp_path)
    for suffix in ("parquet", "jsonl"):
        assert _embed(model_dir, source, tmp_path / f"out.{suffix}", "--input-type", side, *extra) == 0
    online = _online("splade", sparse_engine, model_dir, SPARSE, {"input_type": side})

    table = pq.read_table(tmp_path / "out.parquet")
    column = table.column("embedding")
    assert column.type == pa.list_(pa.struct([("index", pa.int32()), ("value", pa.float32())]))
    assert table.column("id").to_pylist() == [f"d{i}" for i in range(len(TEXTS))]
    from_parquet = [{"indices": [p["index"] for p in row], "values": [p["value"] for p in row]}
                    for row in column.to_pylist()]
    _assert_sparse_equal(from_parquet, online)
    lines = [orjson.loads(line) for line in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert [line["id"] for line in lines] == [f"d{i}" for i in range(len(TEXTS))]
    _assert_sparse_equal([line["embedding"] for line in lines], online)
    assert len({tuple(v["indices"]) for v in online}) > 1  # honest: the vectors differ by text

    if side == "search_document":  # the column is what Qdrant indexes: each document finds itself first
        _qdrant_finds_each_document(table)


def _qdrant_finds_each_document(table: pa.Table) -> None:
    qdrant = pytest.importorskip("qdrant_client")
    from qdrant_client import models

    client = qdrant.QdrantClient(":memory:")
    client.create_collection("docs", vectors_config={},
                             sparse_vectors_config={"splade": models.SparseVectorParams()})
    vectors = [models.SparseVector(indices=[p["index"] for p in row], values=[p["value"] for p in row])
               for row in table.column("embedding").to_pylist()]
    client.upsert("docs", [models.PointStruct(id=n, vector={"splade": vector}, payload={"id": ident})
                           for n, (vector, ident) in enumerate(zip(vectors, table.column("id").to_pylist(),
                                                                   strict=True))])
    assert client.count("docs").count == len(TEXTS)
    for n, vector in enumerate(vectors):
        hits = client.query_points("docs", query=vector, using="splade", limit=1).points
        assert hits[0].id == n


def test_token_vectors_parquet_and_jsonl_equal_the_online_ones(tmp_path: Path, colbert_dir: Path) -> None:
    """A ColBERT model's documents (marker, skip-list dropped) as nested lists, one vector per kept token."""
    source = _write_input(tmp_path)
    for suffix in ("parquet", "jsonl"):
        assert _embed(colbert_dir, source, tmp_path / f"out.{suffix}", "--input-type", "search_document") == 0
    online = _online("colbert", colbert_engine, colbert_dir, MULTIVECTOR, {"input_type": "search_document"})

    column = pq.read_table(tmp_path / "out.parquet").column("embedding")
    assert column.type == pa.list_(pa.list_(pa.float32()))
    lines = [orjson.loads(line)["embedding"] for line in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    for ours in (column.to_pylist(), lines):
        for mine, theirs in zip(ours, online, strict=True):
            assert np.shape(mine) == np.shape(theirs)
            np.testing.assert_allclose(np.asarray(mine, np.float32), theirs, atol=CLOSE, rtol=0)
    assert len({len(matrix) for matrix in online}) > 1  # honest: token counts differ by text


def test_an_interrupted_sparse_job_resumes_to_the_same_bytes(tmp_path: Path, inference_free_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from embedding_service.engine.sparse import SparseEngine

    source = _write_input(tmp_path)
    assert _embed(inference_free_dir, source, tmp_path / "whole.parquet") == 0
    calls, run = [0], SparseEngine.encode_batch

    def dies_in_the_third_chunk(self: Any, seqs: list[list[int]], **side: Any) -> Any:
        calls[0] += 1
        if calls[0] == 5:  # (two batches of three a chunk of five): the third chunk's first batch
            raise RuntimeError("the model failed")
        return run(self, seqs, **side)

    monkeypatch.setattr(SparseEngine, "encode_batch", dies_in_the_third_chunk)
    assert _embed(inference_free_dir, source, tmp_path / "resumed.parquet") == 1
    assert not (tmp_path / "resumed.parquet").exists()
    capsys.readouterr()
    monkeypatch.setattr(SparseEngine, "encode_batch", run)
    assert _embed(inference_free_dir, source, tmp_path / "resumed.parquet") == 0
    assert "were done before (resumed)" in capsys.readouterr().err
    resumed, whole = pq.read_table(tmp_path / "resumed.parquet"), pq.read_table(tmp_path / "whole.parquet")
    assert resumed.equals(whole)


@pytest.mark.parametrize(("output", "extra", "message"), [
    ("out.npy", [], "a .npy matrix cannot hold"),
    ("out.parquet", ["--vector-type", "int8"], "--vector-type int8 applies to dense vectors"),
    ("out.parquet", ["--dimensions", "8"], "--dimensions applies to embedding models"),
])
def test_what_does_not_apply_is_refused_in_one_line(tmp_path: Path, inference_free_dir: Path, output: str,
                                                    extra: list[str], message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert _embed(inference_free_dir, _write_input(tmp_path), tmp_path / output, *extra) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_input_type_is_refused_for_a_dense_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["embed", str(_write_input(tmp_path)), "-o", str(tmp_path / "out.parquet"), "--engine", "fake",
                 "--input-type", "search_query", "--log-level", "WARNING"])
    assert code == 1 and "--input-type selects the query or document side" in capsys.readouterr().err
