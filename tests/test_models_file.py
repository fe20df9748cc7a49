"""Several models in one server: the models file (each error one line naming file, entry and field), the plan it
gives, and routing by `model` on every endpoint, in-process on fake engines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from embedding_service.api.app import create_app
from embedding_service.api.served import Served
from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.backends.fake.scoring import FakeScoringBackend
from embedding_service.config import EmbeddingConfig
from embedding_service.engine.engine import EmbeddingEngine
from embedding_service.engine.rerank import RerankEngine
from embedding_service.models_file import ModelsFileError, read_models_file
from embedding_service.service import plan_service

from .conftest import engine_options, make_settings


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def _read(tmp_path: Path, text: str, **server: Any) -> list[Any]:
    return read_models_file(make_settings(models_file=str(_file(tmp_path, text)), **server))


THREE = """
models:
  - name: small
    aliases: [text-embedding-3-small]
    model_name: acme/small
    task: embed
  - name: big
    model_name: acme/big
    engine: fake
    max_batch_size: 8
    dtype: float32
  - name: judge
    model_name: acme/judge
    task: rerank
    max_rerank_documents: 50
"""


def test_each_entry_gets_the_server_settings_under_its_own(tmp_path: Path) -> None:
    entries = _read(tmp_path, THREE, engine="fake", max_batch_size=64, port=9999)
    assert [(e.name, e.task, e.aliases) for e in entries] == [
        ("small", "embed", ("text-embedding-3-small",)), ("big", "embed", ()), ("judge", "rerank", ())]
    small, big, judge = (e.settings for e in entries)
    assert (small.max_batch_size, big.max_batch_size, big.dtype, small.dtype) == (64, 8, "float32", "float16")
    assert small.port == big.port == 9999 and small.public_model_name == "small" and small.model_name == "acme/small"
    assert judge.public_rerank_model_name == "judge" and judge.rerank_only and judge.max_rerank_documents == 50
    plan = plan_service(make_settings(models_file=str(tmp_path / "models.yaml"), engine="fake"))
    assert list(plan.models) == ["small", "big", "judge"]
    assert plan.embed.name == "small" and plan.rerank is not None and plan.rerank.name == "judge"
    assert plan.models["small"].aliases == ("text-embedding-3-small",)
    assert plan.models["big"].engine_options.max_batch_size == 8


@pytest.mark.parametrize(("text", "message"), [
    ("models:\n  - name: a\n    model_name: x\n    batch_size: 3\n",
     "models[0] (a): batch_size: not a per-model field"),
    ("models:\n  - name: a\n    model_name: x\n    port: 3\n",
     "models[0] (a): port: not a per-model field (a server-wide setting: give it as a flag or EMBEDDING_ variable)"),
    ("models:\n  - name: a\n    model_name: x\n  - name: b\n    model_name: y\n    max_batch_size: 0\n",
     "models[1] (b): max_batch_size: Input should be greater than or equal to 1"),
    ("models:\n  - name: a\n    model_name: x\n    task: classify\n",
     "models[0] (a): task: 'classify'; one of embed, rerank"),
    ("models:\n  - model_name: x\n", "models[0]: name: required"),
    ("models:\n  - name: a\n", "models[0] (a): give exactly one of model_path, model_name (a hub id) or demo: true"),
    ("models:\n  - name: a\n    model_name: x\n    model_path: /y\n", "give exactly one of"),
    ("models:\n  - name: a\n    model_name: x\n  - name: b\n    model_name: y\n    aliases: [a]\n",
     "the name 'a' is given twice (a and b)"),
    ("models:\n  - name: a\n    demo: true\n    task: rerank\n", "the demo model is an embedding model"),
    ("models: [\n", "not valid YAML"),
    ("model:\n  - name: a\n", "expected one key, `models:`"),
    ("models: []\n", "lists 0 models"),
])
def test_a_bad_file_is_one_line_naming_the_file_the_entry_and_the_field(tmp_path: Path, text: str,
                                                                       message: str) -> None:
    with pytest.raises(ModelsFileError) as caught:
        _read(tmp_path, text)
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"models file {tmp_path / 'models.yaml'}: ") and message in line, line


def test_a_missing_file_and_model_flags_beside_a_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelsFileError, match="cannot read it"):
        read_models_file(make_settings(models_file=str(tmp_path / "nope.yaml")))
    with pytest.raises(ValueError, match="models_file lists every model: drop rerank_model_path"):
        EmbeddingConfig(models_file="m.yaml", rerank_model_path="/r")


# --- routing, in-process on fake engines -------------------------------------------------------------------

def _embedder(name: str, dimension: int) -> EmbeddingEngine:
    return EmbeddingEngine(FakeBackend(dimension=dimension, max_model_len=32, model=name),
                           engine_options(max_model_len=32, batch_timeout_ms=1))


@pytest.fixture
async def three() -> AsyncIterator[httpx.AsyncClient]:
    models = [Served("small", _embedder("small", 16), "embed", ("text-embedding-3-small",)),
              Served("big", _embedder("big", 48), "embed"),
              Served("judge", RerankEngine(FakeScoringBackend(model="judge", max_model_len=32),
                                           engine_options(max_model_len=32, batch_timeout_ms=1), max_documents=10),
                     "rerank")]
    app = create_app(make_settings(engine="fake"), models=models)
    for model in models:
        await model.engine.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            yield http
    finally:
        for model in models:
            await model.engine.stop()


async def _embed(http: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await http.post("/v1/embeddings", json={"input": ["a text", "another"], **body})


async def test_model_picks_the_model_and_a_default_is_the_first_of_the_task(three: httpx.AsyncClient) -> None:
    for model, dims in (("small", 16), ("big", 48), ("text-embedding-3-small", 16), (None, 16)):
        response = await _embed(three, **({"model": model} if model else {}))
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["data"][0]["embedding"]) == dims
        assert body["model"] == ("small" if dims == 16 else "big")  # the served name, even for an alias
    rerank = await three.post("/v1/rerank", json={"model": "whatever-cohere-sends", "query": "a", "documents": ["a"]})
    assert rerank.status_code == 200 and rerank.json()["model"] == "judge"  # one reranker: any name is it
    score = await three.post("/v1/score", json={"model": "big", "text_1": "a", "text_2": ["a", "b"]})
    assert score.status_code == 200 and score.json()["model"] == "big"  # an embedding model scores by cosine


async def test_an_unknown_name_among_several_is_404_and_the_wrong_task_is_400(three: httpx.AsyncClient) -> None:
    unknown = await _embed(three, model="text-embedding-ada-002")
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["message"] == ("model 'text-embedding-ada-002' is not served here; this server serves "
                                "'small', 'big', 'judge'")
    reranker = await _embed(three, model="judge")
    assert reranker.status_code == 400 and reranker.json()["error"]["code"] == "model_cannot_embed"
    embedder = await three.post("/v1/rerank", json={"model": "small", "query": "a", "documents": ["a"]})
    assert embedder.status_code == 400 and embedder.json()["error"]["code"] == "model_cannot_rerank"


async def test_models_health_and_probes_cover_every_model(three: httpx.AsyncClient) -> None:
    cards = (await three.get("/v1/models")).json()["data"]
    assert [(c["id"], c["task"], c.get("dimensions"), c["max_model_len"]) for c in cards] == [
        ("small", "embed", 16, 32), ("big", "embed", 48, 32), ("judge", "rerank", None, 32)]
    assert cards[0]["aliases"] == ["text-embedding-3-small"]
    alias = await three.get("/v1/models/text-embedding-3-small")
    assert alias.status_code == 200 and alias.json()["id"] == "small"
    health = (await three.get("/health")).json()
    assert health["model"] == "small" and [m["model"] for m in health["models"]] == ["small", "big", "judge"]
    ready = await three.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "models": {"small": "healthy", "big": "healthy", "judge": "healthy"}}
    assert (await three.get("/health/live")).json() == {"status": "alive"}
    endpoints = (await three.get("/")).json()["endpoints"]
    assert endpoints[0] == "/health"
    assert {"/v1/embeddings", "/v1/rerank", "/v1/score", "/metrics", "/health/ready", "/v1/models"} <= set(endpoints)


async def test_ready_is_503_while_any_model_loads_and_live_stays_200() -> None:
    loading = _embedder("late", 8)
    models = [Served("now", _embedder("now", 8), "embed"), Served("late", loading, "embed")]
    app = create_app(make_settings(engine="fake"), models=models)
    await models[0].engine.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            ready = await http.get("/health/ready")
            assert ready.status_code == 503
            assert ready.json() == {"status": "loading", "models": {"now": "healthy", "late": "loading"}}
            assert (await http.get("/health/live")).status_code == 200
            assert (await _embed(http, model="now")).status_code == 200  # a loaded model serves meanwhile
            late = await _embed(http, model="late")
            assert late.status_code == 503 and late.json()["error"]["code"] == "model_not_ready"
    finally:
        await models[0].engine.stop()
