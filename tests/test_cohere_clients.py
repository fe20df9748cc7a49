"""Real Cohere clients nobody here wrote, against a real server serving two models from a models file (torch,
fp32): cohere.ClientV2 (POST /v2/embed) with every embedding type, and LangChain's CohereEmbeddings
(cohere.Client, POST /v1/embed). Floats equal sentence-transformers' own encode; quantized types equal its
quantize_embeddings of the served floats (ranges [-1, 1]); input_type on the tiny Qwen3 equals
sentence-transformers with the card's prompts."""

from __future__ import annotations

import base64
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
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Embeddings map text to vectors", "naïve café ☕ 東京",
         "What is the capital of China?"]
ALL_TYPES = ["float", "int8", "uint8", "binary", "ubinary", "base64"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_qwen_dir: Path, minilm_dir: Path) -> Iterator[ServerProcess]:
    """One server, both models (a models file): `model` picks the one each Cohere call gets."""
    models = tmp_path_factory.mktemp("cohere-models") / "models.yaml"
    models.write_text(f"models:\n  - name: {MINILM}\n    demo: true\n  - name: {QWEN}\n"
                      f"    model_path: {tiny_qwen_dir}\n")
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
