"""Real Cohere clients nobody here wrote, against a real server serving two models from a models file (torch,
fp32): cohere.ClientV2 (POST /v2/embed) with every embedding type, LangChain's CohereEmbeddings and
LlamaIndex's CohereEmbedding (cohere.Client, POST /v1/embed). Floats equal sentence-transformers' own encode;
quantized types equal its quantize_embeddings of the served floats (MiniLM: ranges [-1, 1]; the tiny Qwen3:
an operator's `int8_ranges` file; `calibrate` is tested in process, tests/test_int8_ranges.py, since embedding
its 512 texts costs too much here); input_type on the tiny Qwen3 equals sentence-transformers with the card's
prompts."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from embedding_service.engine.input_types import TASK_INSTRUCTIONS
from embedding_service.engine.prompts import format_instruction
from embedding_service.vector_types import unit_ranges

from .conftest import ServerProcess

pytestmark = pytest.mark.slow

cohere = pytest.importorskip("cohere")
st = pytest.importorskip("sentence_transformers")

MINILM, QWEN = "all-MiniLM-L6-v2", "tiny-qwen3"
# LlamaIndex's CohereEmbedding takes only Cohere's model names: the models answer to one each as an alias.
MINILM_ALIAS, QWEN_ALIAS = "embed-english-light-v3.0", "embed-multilingual-light-v3.0"
QWEN_DIM = 128  # the tiny Qwen3's hidden size
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Embeddings map text to vectors", "naïve café ☕ 東京",
         "What is the capital of China?"]
ALL_TYPES = ["float", "int8", "uint8", "binary", "ubinary", "base64"]


@pytest.fixture(scope="module")
def qwen_ranges(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An operator's int8 ranges for the tiny Qwen3's 128 dimensions, each its own, narrower than [-1, 1]."""
    rng = np.random.default_rng(38)
    starts = -rng.uniform(0.15, 0.35, QWEN_DIM)
    path = tmp_path_factory.mktemp("cohere-ranges") / "qwen-ranges.npy"
    np.save(path, np.vstack((starts, starts + rng.uniform(0.3, 0.7, QWEN_DIM))).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_qwen_dir: Path, minilm_dir: Path,
           qwen_ranges: Path) -> Iterator[ServerProcess]:
    """One server, both models (a models file): `model` picks the one each Cohere call gets."""
    models = tmp_path_factory.mktemp("cohere-models") / "models.yaml"
    models.write_text(f"models:\n  - name: {MINILM}\n    aliases: [{MINILM_ALIAS}]\n    demo: true\n"
                      f"  - name: {QWEN}\n    aliases: [{QWEN_ALIAS}]\n    model_path: {tiny_qwen_dir}\n"
                      f"    int8_ranges: {qwen_ranges}\n")
    process = ServerProcess(["--engine", "torch", "--dtype", "float32", "--models-file", str(models)])
    try:
        process.wait_healthy(240)
        yield process
    finally:
        assert process.stop() == 0, process.log()


def _raw(server: ServerProcess, texts: list[str], **extra: object) -> np.ndarray:
    response = httpx.post(server.url + "/v1/embeddings", json={"input": texts, "model": MINILM, **extra}, timeout=60)
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


def test_client_v2_every_type_on_minilm(server: ServerProcess, minilm_dir: Path) -> None:
    client = cohere.ClientV2(api_key="unused", base_url=server.url)
    response = client.embed(model=MINILM, texts=TEXTS, input_type="search_document", embedding_types=ALL_TYPES)
    got = response.embeddings
    floats = np.array(got.float_, dtype=np.float32)
    reference = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(floats, reference, atol=2e-6, rtol=0)
    raw = _raw(server, TEXTS)
    assert floats.tobytes() == raw.tobytes()
    base64_rows = np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in got.base64])
    assert base64_rows.tobytes() == raw.tobytes()
    quantization = pytest.importorskip("sentence_transformers.util.quantization")
    for kind in ("int8", "uint8", "binary", "ubinary"):
        expected = quantization.quantize_embeddings(raw, precision=kind,
                                                    ranges=unit_ranges(384) if kind.endswith("int8") else None)
        assert np.array(getattr(got, kind)).tolist() == expected.tolist(), kind
        typed = httpx.post(server.url + "/v1/embeddings", json={"input": TEXTS, "model": MINILM,
                                                                "encoding_format": kind}).json()
        assert [row["embedding"] for row in typed["data"]] == expected.tolist(), kind
    usage = httpx.post(server.url + "/v1/embeddings", json={"input": TEXTS, "model": MINILM}).json()["usage"]
    assert response.meta.billed_units.input_tokens == usage["prompt_tokens"]


def test_client_v2_errors_are_raised_with_the_message(server: ServerProcess) -> None:
    client = cohere.ClientV2(api_key="unused", base_url=server.url)
    with pytest.raises(cohere.errors.BadRequestError) as caught:
        client.embed(model=MINILM, texts=["word " * 400], input_type="search_document")  # over 256 tokens
    assert "more than this model's limit of 256" in caught.value.body["message"]
    cut = client.embed(model=MINILM, texts=["word " * 400], input_type="search_document", truncate="END")
    assert cut.meta.billed_units.input_tokens == 256
    with pytest.raises(cohere.errors.NotFoundError) as unknown:  # two embedding models: a name must pick one
        client.embed(model="embed-english-v3.0", texts=["a"], input_type="search_document")
    assert "is not served here" in unknown.value.body["message"]


def test_langchain_cohere_embeddings(server: ServerProcess) -> None:
    pytest.importorskip("langchain_cohere")
    from langchain_cohere import CohereEmbeddings

    embeddings = CohereEmbeddings(model=MINILM, base_url=server.url, cohere_api_key="unused")
    raw = _raw(server, TEXTS)
    assert np.array(embeddings.embed_documents(TEXTS), dtype=np.float32).tobytes() == raw.tobytes()
    alone = _raw(server, TEXTS[3:])  # (a batch of one: padding changes the last bits of a vector)
    assert np.array(embeddings.embed_query(TEXTS[3]), dtype=np.float32).tobytes() == alone[0].tobytes()
    int8 = CohereEmbeddings(model=MINILM, base_url=server.url, cohere_api_key="unused", embedding_types=["int8"])
    expected = httpx.post(server.url + "/v1/embeddings", json={"input": TEXTS, "model": MINILM,
                                                               "encoding_format": "int8"}).json()
    assert int8.embed_documents(TEXTS) == [[float(v) for v in row["embedding"]] for row in expected["data"]]


def test_input_type_on_qwen3_equals_sentence_transformers(server: ServerProcess, tiny_qwen_dir: Path) -> None:
    client = cohere.ClientV2(api_key="unused", base_url=server.url)
    model = st.SentenceTransformer(str(tiny_qwen_dir), device="cpu")
    cases = {"search_query": model.encode(TEXTS, prompt_name="query"),
             "search_document": model.encode(TEXTS),
             **{task: model.encode([format_instruction(text_instruction, t) for t in TEXTS])
                for task, text_instruction in TASK_INSTRUCTIONS.items()}}
    for input_type, expected in cases.items():
        response = client.embed(model=QWEN, texts=TEXTS, input_type=input_type, embedding_types=["float"])
        np.testing.assert_allclose(np.array(response.embeddings.float_), expected, atol=2e-5, rtol=0,
                                   err_msg=input_type)
    query = np.array(client.embed(model=QWEN, texts=TEXTS, input_type="search_query").embeddings.float_)
    assert not np.allclose(query, cases["search_document"], atol=1e-3)  # the prompt does change the vectors


def test_int8_ranges_file_on_qwen3(server: ServerProcess, qwen_ranges: Path) -> None:
    """ClientV2 (/v2/embed) and /v1/embeddings quantise through the model's ranges file exactly as
    quantize_embeddings(ranges=...) does (and not as [-1, 1] would), Matryoshka sizes through its first columns."""
    ranges = np.load(qwen_ranges)
    client = cohere.ClientV2(api_key="unused", base_url=server.url)
    got = client.embed(model=QWEN, texts=TEXTS, input_type="search_document",
                       embedding_types=["float", "int8", "uint8"]).embeddings
    floats = np.array(got.float_, dtype=np.float32)
    quantization = pytest.importorskip("sentence_transformers.util.quantization")
    for kind in ("int8", "uint8"):
        expected = quantization.quantize_embeddings(floats, precision=kind, ranges=ranges).tolist()
        assert np.array(getattr(got, kind)).tolist() == expected, kind
        typed = httpx.post(server.url + "/v1/embeddings", json={"input": TEXTS, "model": QWEN, "encoding_format": kind,
                                                                "input_type": "search_document"}).json()
        assert [row["embedding"] for row in typed["data"]] == expected, kind
    unit = quantization.quantize_embeddings(floats, precision="int8", ranges=unit_ranges(QWEN_DIM)).tolist()
    assert np.array(got.int8).tolist() != unit
    short = client.embed(model=QWEN, texts=TEXTS, input_type="search_document", output_dimension=64,
                         embedding_types=["float", "uint8"]).embeddings
    assert np.array(short.uint8).tolist() == quantization.quantize_embeddings(
        np.array(short.float_, dtype=np.float32), precision="uint8", ranges=ranges[:, :64]).tolist()


def test_llama_index_cohere_embedding(server: ServerProcess) -> None:
    """LlamaIndex's CohereEmbedding (cohere.Client: POST /v1/embed) embeds documents as search_document and a
    query as search_query, with vectors equal to /v2/embed's floats for the same input_type."""
    pytest.importorskip("llama_index.embeddings.cohere")
    from llama_index.embeddings.cohere import CohereEmbedding

    sent: list[tuple[str, dict]] = []

    def record(request: httpx.Request) -> None:
        sent.append((request.url.path, json.loads(request.content)))

    def v2_floats(model: str, texts: list[str], input_type: str) -> bytes:
        response = httpx.post(server.url + "/v2/embed", json={"model": model, "texts": texts, "input_type": input_type,
                                                              "embedding_types": ["float"]}, timeout=60)
        assert response.status_code == 200, response.text
        return np.array(response.json()["embeddings"]["float"], dtype=np.float32).tobytes()

    for alias, name in ((MINILM_ALIAS, MINILM), (QWEN_ALIAS, QWEN)):
        embed_model = CohereEmbedding(api_key="unused", model_name=alias, base_url=server.url,
                                      httpx_client=httpx.Client(event_hooks={"request": [record]}))
        documents = embed_model.get_text_embedding_batch(TEXTS)
        query = embed_model.get_query_embedding(TEXTS[3])
        assert np.array(documents, dtype=np.float32).tobytes() == v2_floats(name, TEXTS, "search_document"), alias
        assert np.array([query], dtype=np.float32).tobytes() == v2_floats(name, TEXTS[3:], "search_query"), alias
        (doc_path, doc_body), (query_path, query_body) = sent[-2:]
        assert (doc_body["input_type"], query_body["input_type"]) == ("search_document", "search_query")
        assert doc_body["model"] == query_body["model"] == alias and doc_path == query_path
    # On Qwen3 the input type changes the vector (its query prompt): the query's is not the document's.
    qwen = CohereEmbedding(api_key="unused", model_name=QWEN_ALIAS, base_url=server.url)
    assert not np.allclose(qwen.get_query_embedding(TEXTS[3]), qwen.get_text_embedding(TEXTS[3]), atol=1e-3)
