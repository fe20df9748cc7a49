"""Long inputs on real models (tiny random Qwen3: last token; all-MiniLM-L6-v2: mean; MiniLM read with [CLS]
pooling), torch engine in process: chunk-and-pool equals sentence-transformers run on each window and the
windows' token-weighted mean, renormalised; truncation from either end (Cohere START / END) equals
sentence-transformers on the kept ids; refusal names the limit. The rule: engine/chunking.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio

from embedding_service.api.app import create_app
from embedding_service.service import build_engine, plan_model

from .conftest import make_settings

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
st = pytest.importorskip("sentence_transformers")

LIMIT = 64
LONG = " ".join(f"sentence {i} tells of rivers, maps and the quiet ferry at dawn." for i in range(40))
INSTRUCTION = "Find passages about rivers"


@dataclass
class Model:
    http: httpx.AsyncClient
    reference: Any  # sentence_transformers.SentenceTransformer

    @property
    def tokenizer(self) -> Any:
        return self.reference.tokenizer

    def specials(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a text."""
        full, bare = self.tokenizer.encode("river"), self.tokenizer.encode("river", add_special_tokens=False)
        start = next(i for i in range(len(full)) if full[i:i + len(bare)] == bare)
        return full[:start], full[start + len(bare):]

    def embed_ids(self, seqs: list[list[int]]) -> np.ndarray:
        """sentence-transformers' own forward (its pooling, its Normalize) on each sequence alone."""
        import torch

        rows = []
        with torch.no_grad():
            for ids in seqs:
                tensor = torch.tensor([ids])
                out = self.reference({"input_ids": tensor, "attention_mask": torch.ones_like(tensor)})
                rows.append(torch.nn.functional.normalize(out["sentence_embedding"], dim=-1)[0].numpy())
        return np.stack(rows)

    def chunked(self, text: str, prompt: str = "") -> tuple[np.ndarray, int, int]:
        """The reference: (vector, windows, tokens embedded)."""
        prefix, suffix = self.specials()
        head = prefix + (self.tokenizer.encode(prompt, add_special_tokens=False) if prompt else [])
        body = self.tokenizer.encode(text, add_special_tokens=False)
        width = LIMIT - len(head) - len(suffix)
        windows = [head + body[k:k + width] + suffix for k in range(0, len(body), width)]
        weights = np.array([len(body[k:k + width]) for k in range(0, len(body), width)], dtype=np.float64)
        mean = (self.embed_ids(windows).astype(np.float64) * weights[:, None]).sum(axis=0)
        return (mean / np.linalg.norm(mean)).astype(np.float32), len(windows), sum(map(len, windows))


async def _serve(model_dir: Path, name: str) -> AsyncIterator[Model]:
    config = make_settings(engine="torch", model_path=str(model_dir), served_model_name=name, max_model_len=LIMIT,
                           batch_timeout_ms=0, max_batch_tokens=256, dtype="float32", demo=name == "minilm")
    engine = build_engine(plan_model(config))
    await engine.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(config, engine)),
                                     base_url="http://test") as http:
            yield Model(http, st.SentenceTransformer(str(model_dir), device="cpu"))
    finally:
        await engine.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def qwen(tiny_qwen_dir: Path) -> AsyncIterator[Model]:
    async for model in _serve(tiny_qwen_dir, "qwen"):
        yield model


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def minilm(minilm_dir: Path) -> AsyncIterator[Model]:
    async for model in _serve(minilm_dir, "minilm"):
        yield model


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def minilm_cls(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Model]:
    folder = tmp_path_factory.mktemp("minilm-cls")
    for item in minilm_dir.iterdir():  # the same weights, read with [CLS] pooling
        if item.is_file() and item.name != "model.safetensors":
            shutil.copy(item, folder / item.name)
    (folder / "model.safetensors").symlink_to(minilm_dir / "model.safetensors")
    (folder / "1_Pooling").mkdir()
    pooling = json.loads((minilm_dir / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    async for model in _serve(folder, "minilm-cls"):
        yield model


@pytest.fixture(params=["qwen", "minilm", "minilm_cls"])
def model(request: pytest.FixtureRequest) -> Model:
    return request.getfixturevalue(request.param)


async def test_chunk_equals_the_weighted_mean_of_the_windows(model: Model) -> None:
    expected, windows, tokens = model.chunked(LONG)
    assert windows >= 4
    short = "a short text stays one input"
    response = await model.http.post("/v1/embeddings", json={"input": [short, LONG], "long_inputs": "chunk"})
    assert response.status_code == 200, response.text
    rows = np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)
    np.testing.assert_allclose(rows[1], expected, atol=2e-5)
    np.testing.assert_allclose(rows[0], model.embed_ids([model.tokenizer.encode(short)])[0], atol=2e-5)
    assert response.json()["usage"]["prompt_tokens"] == tokens + len(model.tokenizer.encode(short))
    assert response.headers["X-Chunked-Inputs"] == f"1:{windows}" and "X-Truncated-Inputs" not in response.headers


async def test_the_instruction_heads_every_window(qwen: Model) -> None:
    expected, _, tokens = qwen.chunked(LONG, prompt=f"Instruct: {INSTRUCTION}\nQuery:")
    response = await qwen.http.post("/v1/embeddings", json={"input": LONG, "instruction": INSTRUCTION,
                                                            "long_inputs": "chunk"})
    np.testing.assert_allclose(np.array(response.json()["data"][0]["embedding"]), expected, atol=2e-5)
    assert response.json()["usage"]["prompt_tokens"] == tokens
    # Qwen3's own search_query instruction is longer than a window here: 400 naming the text, Cohere's shape.
    cohere = await qwen.http.post("/v2/embed", json={"texts": [LONG], "input_type": "search_query",
                                                     "long_inputs": "chunk"})
    assert cohere.status_code == 400 and cohere.json()["message"].startswith("texts[0] cannot be chunked")


async def test_cohere_chunk_says_so_in_meta_warnings(minilm: Model) -> None:
    expected, windows, tokens = minilm.chunked(LONG)
    response = await minilm.http.post("/v2/embed", json={"texts": ["x", LONG], "long_inputs": "chunk"})
    body = response.json()
    assert response.status_code == 200, body
    np.testing.assert_allclose(np.array(body["embeddings"]["float"][1]), expected, atol=2e-5)
    assert body["meta"]["warnings"] == [f"texts[1] was embedded in {windows} windows, averaged"]
    assert body["meta"]["billed_units"]["input_tokens"] == tokens + len(minilm.tokenizer.encode("x"))
    assert response.headers["X-Chunked-Inputs"] == f"1:{windows}"


async def test_a_text_longer_than_a_tokenisation_slice(minilm: Model) -> None:
    text = " ".join([LONG] * 14)  # ~36K characters: tokenised in slices, equal to WordPiece on the whole
    assert len(text) > 32_768
    expected, windows, _ = minilm.chunked(text)
    response = await minilm.http.post("/v1/embeddings", json={"input": text, "long_inputs": "chunk"})
    np.testing.assert_allclose(np.array(response.json()["data"][0]["embedding"]), expected, atol=2e-5)
    assert response.headers["X-Chunked-Inputs"] == f"0:{windows}"


async def test_truncate_keeps_either_end_and_says_so(minilm: Model) -> None:
    prefix, suffix = minilm.specials()
    body = minilm.tokenizer.encode(LONG, add_special_tokens=False)
    room = LIMIT - len(prefix) - len(suffix)
    for truncate, kept in (("END", body[:room]), ("START", body[-room:])):
        response = await minilm.http.post("/v2/embed", json={"texts": ["short", LONG], "truncate": truncate})
        assert response.status_code == 200, response.text
        got = np.array(response.json()["embeddings"]["float"][1], dtype=np.float32)
        np.testing.assert_allclose(got, minilm.embed_ids([prefix + kept + suffix])[0], atol=2e-5)
        assert response.json()["meta"]["warnings"] == ["texts[1] was truncated to the token limit"]
        assert response.headers["X-Truncated-Inputs"] == "1"
    openai = await minilm.http.post("/v1/embeddings", json={"input": [LONG, "x", LONG], "truncate": True})
    assert openai.headers["X-Truncated-Inputs"] == "0,2"
    np.testing.assert_allclose(np.array(openai.json()["data"][0]["embedding"]),
                               minilm.embed_ids([prefix + body[:room] + suffix])[0], atol=2e-5)


async def test_refuse_is_the_default_and_names_the_limit(minilm: Model) -> None:
    tokens = len(minilm.tokenizer.encode(LONG))
    for path, payload in (("/v1/embeddings", {"input": LONG}), ("/v2/embed", {"texts": [LONG]}),
                          ("/v1/embeddings", {"input": LONG, "long_inputs": "refuse"})):
        response = await minilm.http.post(path, json=payload)
        assert response.status_code == 400
        message = response.json()["error"]["message"] if path == "/v1/embeddings" else response.json()["message"]
        assert f"has {tokens} tokens" in message and f"limit of {LIMIT}" in message
