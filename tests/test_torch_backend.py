"""The torch engine against reference computations written here (transformers / sentence-transformers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedding_service.backends.torch.embed import TorchBackend
from embedding_service.engine.engine import EmbeddingEngine
from embedding_service.engine.types import EmbedRequest

from .conftest import backend_options, engine_options
from .test_length_groups import check_a_mixed_batch_is_cut

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]
torch = pytest.importorskip("torch")

TASK = "Given a web search query, retrieve relevant passages that answer the query"
SHORT = ["what is the capital of China?", "Explain gravity", "hi"]
LONG = [" ".join(f"word{i % 97} token{i % 13}" for i in range(60))]


def reference_qwen(model_dir: Path, texts: list[str]) -> np.ndarray:
    """The Qwen3-Embedding model card's recipe: left padding, last token, L2 normalise."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=8192, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert bool(batch["attention_mask"][:, -1].all())  # left padded: the last column is the last token
    return torch.nn.functional.normalize(hidden[:, -1], p=2, dim=1).numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def qwen_engine_factory(tiny_qwen_dir: Path):
    async def make() -> EmbeddingEngine:
        backend = TorchBackend(backend_options(tiny_qwen_dir, device="cpu", dtype="float32", max_model_len=2048))
        engine = EmbeddingEngine(backend, engine_options(max_model_len=2048, batch_timeout_ms=1))
        await engine.start()
        return engine
    return make


async def test_qwen_vectors_equal_the_model_card_recipe(qwen_engine_factory, tiny_qwen_dir: Path) -> None:
    engine = await qwen_engine_factory()
    try:
        texts = SHORT + LONG
        ours = (await engine.embed(EmbedRequest(texts=texts))).vectors
        assert cosines(ours, reference_qwen(tiny_qwen_dir, texts)).min() >= 0.9999
        # a text alone and inside a mixed-length batch give the same vector
        alone = (await engine.embed(EmbedRequest(texts=[SHORT[2]]))).vectors
        assert cosines(alone, ours[2:3]).min() >= 0.9999
        assert engine.info is not None and engine.info.special_suffix  # <|endoftext|> closes every text
    finally:
        await engine.stop()


async def test_qwen_instruction_format_is_exact(qwen_engine_factory, tiny_qwen_dir: Path) -> None:
    engine = await qwen_engine_factory()
    try:
        result = await engine.embed(EmbedRequest(texts=SHORT, instruction=TASK))
        formatted = [f"Instruct: {TASK}\nQuery:{q}" for q in SHORT]
        assert cosines(result.vectors, reference_qwen(tiny_qwen_dir, formatted)).min() >= 0.9999
        counted = await engine.tokenize_count(formatted)
        assert result.prompt_tokens == sum(counted)
    finally:
        await engine.stop()


async def test_minilm_equals_sentence_transformers(minilm_dir: Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    texts = ["A man is eating food.", "A man is riding a horse.", "The new movie is awesome", "x"]
    reference = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, normalize_embeddings=True)
    backend = TorchBackend(backend_options(minilm_dir, device="cpu", dtype="float32", max_model_len=512))
    engine = EmbeddingEngine(backend, engine_options(max_model_len=512))
    await engine.start()
    try:
        ours = (await engine.embed(EmbedRequest(texts=texts))).vectors
        assert cosines(ours, reference).min() >= 0.9999
        assert engine.info is not None and engine.info.dimension == 384
        # real semantics: the two sentences about a man are closer to each other than to the movie
        assert ours[0] @ ours[1] > ours[0] @ ours[2]
    finally:
        await engine.stop()


def test_on_the_cpu_a_batch_of_mixed_lengths_runs_as_forwards_of_similar_lengths(
        minilm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = TorchBackend(backend_options(minilm_dir, device="cpu", dtype="float32", max_model_len=512))
    backend.load()
    check_a_mixed_batch_is_cut(backend, monkeypatch)  # (runtime/length_groups.py)
