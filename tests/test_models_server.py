"""A real server with a models file of three models (the demo MiniLM, a tiny random Qwen3 on torch fp32, a tiny
BERT cross-encoder) answers exactly as three single-model servers do, and the openai SDK selects models by name."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from .conftest import ServerProcess, serving

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

TEXTS = ["The capital of China is Beijing.", "Gravity pulls apples down.", "zouza kei lou " * 20]
QUERY, DOCS = "What is the capital of China?", ["Beijing is the capital of China.", "Gravity.", "China is in Asia."]
TORCH_FP32 = ["--engine", "torch", "--dtype", "float32", "--log-level", "WARNING"]


def _served(args: list[str]) -> Iterator[ServerProcess]:
    return serving([*TORCH_FP32, *args])


@pytest.fixture(scope="module")
def models_file(tmp_path_factory: pytest.TempPathFactory, tiny_qwen_dir: Path, cross_encoder_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("models") / "models.yaml"
    path.write_text(f"""models:
  - name: minilm
    demo: true
    task: embed
  - name: qwen3
    model_path: {tiny_qwen_dir}
    task: embed
    engine: torch
    dtype: float32
  - name: reranker
    aliases: [rerank-english-v3.0]
    model_path: {cross_encoder_dir}
    task: rerank
""")
    return path


@pytest.fixture(scope="module")
def server(models_file: Path) -> Iterator[ServerProcess]:
    yield from _served(["--models-file", str(models_file)])


def _vectors(url: str, **body: Any) -> np.ndarray:
    response = httpx.post(url + "/v1/embeddings", json={"input": TEXTS, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return np.asarray([item["embedding"] for item in response.json()["data"]])


def _scores(url: str, **body: Any) -> list[float]:
    response = httpx.post(url + "/v1/rerank", json={"query": QUERY, "documents": DOCS, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return [r["relevance_score"] for r in sorted(response.json()["results"], key=lambda r: r["index"])]


def test_each_model_answers_as_its_single_model_server(server: ServerProcess, tiny_qwen_dir: Path,
                                                       cross_encoder_dir: Path) -> None:
    minilm, qwen3 = _vectors(server.url, model="minilm"), _vectors(server.url, model="qwen3")
    scores = _scores(server.url, model="reranker")
    assert minilm.shape == (3, 384) and np.ptp(scores) > 1e-3
    for args, check in ((["--demo"], lambda url: np.testing.assert_array_equal(_vectors(url), minilm)),
                        (["--model-path", str(tiny_qwen_dir)],
                         lambda url: np.testing.assert_array_equal(_vectors(url), qwen3)),
                        (["--rerank-model-path", str(cross_encoder_dir), "--rerank-only"],
                         lambda url: np.testing.assert_array_equal(_scores(url), scores))):
        for alone in _served(args):
            check(alone.url)


def test_names_models_probes_and_errors(server: ServerProcess) -> None:
    cards = httpx.get(server.url + "/v1/models").json()["data"]
    assert [(c["id"], c["task"], c.get("dimensions")) for c in cards] == [
        ("minilm", "embed", 384), ("qwen3", "embed", cards[1]["dimensions"]), ("reranker", "rerank", None)]
    assert httpx.get(server.url + "/health/ready").status_code == 200
    unknown = httpx.post(server.url + "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    # One reranker: any name reaches it (the Cohere SDK sends its own), and its alias too.
    assert _scores(server.url, model="rerank-english-v3.0") == _scores(server.url, model="reranker")


def test_the_openai_sdk_selects_models_by_name(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    for name in ("minilm", "qwen3"):
        response = client.embeddings.create(model=name, input=TEXTS)
        assert response.model == name
        np.testing.assert_allclose([d.embedding for d in response.data], _vectors(server.url, model=name),
                                   rtol=0, atol=1e-6)  # (the SDK asks for base64 floats and decodes them)
    with pytest.raises(openai.NotFoundError, match="is not served here") as caught:
        client.embeddings.create(model="text-embedding-ada-002", input="x")
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    assert [m.id for m in client.models.list()] == ["minilm", "qwen3", "reranker"]


def test_workers_get_the_parents_plan(tmp_path: Path) -> None:
    """With workers > 1 each worker serves the plan decided once in the parent: the models file is deleted as
    soon as the parent starts the workers (before they could read it), and every worker serves both models."""
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - name: a\n    model_name: acme/a\n  - name: b\n    model_name: acme/b\n")
    server = ServerProcess(["--engine", "fake", "--workers", "2", "--models-file", str(models), "--log-level", "INFO"])
    try:
        deadline = time.monotonic() + 30
        while "starting 2 worker processes" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.01)
        models.unlink()
        server.wait_healthy(60)
        answered = 0
        deadline = time.monotonic() + 30
        while answered < 20 and time.monotonic() < deadline:  # new connections: any worker may take each
            with httpx.Client(base_url=server.url) as http:
                if http.get("/health").status_code != 200:
                    time.sleep(0.2)
                    continue
                assert [c["id"] for c in http.get("/v1/models").json()["data"]] == ["a", "b"]
                response = http.post("/v1/embeddings", json={"model": "b", "input": "x"})
                assert response.status_code == 200 and response.json()["model"] == "b"
                answered += 1
        assert answered == 20, server.log()
        assert "cannot read it" not in server.log()
    finally:
        assert server.stop() == 0, server.log()
