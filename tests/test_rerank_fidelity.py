"""Reranker scores equal the references, fp32: Qwen3-Reranker's model-card code and sentence-transformers'
CrossEncoder.predict, on the torch, openvino (and vLLM) engines; batched and alone, with and without
instruction, documents of 10..3,000 tokens. The fixtures' scores are checked to vary, so equality means something."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedding_service.backends.model.pair_tokenizer import TokenPair

from .conftest import backend_options
from .rerank_reference import CardQwen3Reranker, cross_encoder_predict, documents_of_lengths

pytestmark = pytest.mark.slow

QUERY = "What is the capital of China?"
INSTRUCTION = "Given a question, find the passage that answers it"
QWEN_LENGTHS = [10, 37, 120, 500, 1400, 3000]
CE_LENGTHS = [10, 37, 120, 250, 400]
TOL = 1e-4


def _backend(engine: str, model_dir: Path, max_model_len: int, cache: Path | None = None) -> object:
    if engine == "openvino":
        pytest.importorskip("openvino")
        from embedding_service.backends.openvino.scoring import OpenVinoScoringBackend

        return OpenVinoScoringBackend(backend_options(model_dir, dtype="float32", max_model_len=max_model_len,
                                                      openvino_cache_dir=str(cache)))
    if engine == "vllm":
        pytest.importorskip("vllm")
        from embedding_service.backends.vllm.scoring import VllmScoringBackend

        return VllmScoringBackend(backend_options(model_dir, dtype="float32", max_model_len=max_model_len,
                                                  enforce_eager=True))
    from embedding_service.backends.torch.scoring import TorchScoringBackend

    return TorchScoringBackend(backend_options(model_dir, dtype="float32", max_model_len=max_model_len))


@pytest.fixture(scope="module", params=["torch", "openvino", pytest.param("vllm", marks=pytest.mark.vllm)])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def openvino_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("openvino-rerank")


@pytest.fixture(scope="module")
def reranker(engine: str, tiny_reranker_dir: Path, openvino_cache: Path) -> Iterator[object]:
    backend = _backend(engine, tiny_reranker_dir, 4096, openvino_cache)
    backend.load()  # type: ignore[attr-defined]
    yield backend
    backend.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def cross_encoder(engine: str, cross_encoder_dir: Path, openvino_cache: Path) -> Iterator[object]:
    backend = _backend(engine, cross_encoder_dir, 512, openvino_cache)
    backend.load()  # type: ignore[attr-defined]
    yield backend
    backend.close()  # type: ignore[attr-defined]


def _ours(backend: object, query: str, docs: list[str], instruction: str | None) -> tuple[np.ndarray, np.ndarray]:
    pairs: list[TokenPair] = backend.encode_pairs([query] * len(docs), docs, instruction)  # type: ignore[attr-defined]
    batched = backend.embed(pairs)[:, 0]  # type: ignore[attr-defined]
    alone = np.array([backend.embed([pair])[0, 0] for pair in pairs])  # type: ignore[attr-defined]
    return batched, alone


@pytest.mark.parametrize("instruction", [None, INSTRUCTION])
def test_qwen3_reranker_equals_the_model_card(reranker: object, tiny_reranker_dir: Path, engine: str,
                                             instruction: str | None) -> None:
    card = CardQwen3Reranker(tiny_reranker_dir)
    docs = documents_of_lengths(card.tokenizer, QWEN_LENGTHS)
    expected = np.array([card.scores(QUERY, [doc], instruction)[0] for doc in docs])
    assert np.ptp(expected) > 0.01, f"the fixture's scores barely vary: {expected}"
    batched, alone = _ours(reranker, QUERY, docs, instruction)
    print(f"qwen3 {engine} max abs diff", float(np.abs(batched - expected).max()),
          float(np.abs(alone - expected).max()))
    np.testing.assert_allclose(batched, expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(alone, expected, atol=TOL, rtol=0)
    card_batched = np.array(card.scores(QUERY, docs, instruction))  # the card's own batching agrees too
    np.testing.assert_allclose(card_batched, expected, atol=TOL, rtol=0)


def test_instruction_changes_the_score(reranker: object) -> None:
    docs = ["Beijing is the capital of China.", "Paris is in France."]
    plain, _ = _ours(reranker, QUERY, docs, None)
    instructed, _ = _ours(reranker, QUERY, docs, INSTRUCTION)
    assert np.abs(plain - instructed).max() > 1e-3


def test_cross_encoder_equals_sentence_transformers(cross_encoder: object, cross_encoder_dir: Path,
                                                    engine: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(cross_encoder_dir))
    docs = documents_of_lengths(tokenizer, CE_LENGTHS)
    expected = np.array(cross_encoder_predict(cross_encoder_dir, QUERY, docs))
    assert np.ptp(expected) > 0.01, f"the fixture's scores barely vary: {expected}"
    batched, alone = _ours(cross_encoder, QUERY, docs, None)
    print(f"cross-encoder {engine} max abs diff", float(np.abs(batched - expected).max()),
          float(np.abs(alone - expected).max()))
    np.testing.assert_allclose(batched, expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(alone, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("engine_name", ["torch", "openvino"])
def test_cross_encoder_identity_activation(tmp_path: Path, minilm_dir: Path, engine_name: str) -> None:
    """ms-marco cross-encoders declare Identity: raw logits, as sentence-transformers returns them."""
    from testkit.random_models import build_random_cross_encoder

    model_dir = build_random_cross_encoder(tmp_path / "ce", minilm_dir, activation="torch.nn.modules.linear.Identity")
    backend: Any = _backend(engine_name, model_dir, 512, tmp_path / "openvino")
    backend.load()
    docs = ["Beijing is the capital of China.", "Gravity pulls", "lorem ipsum " * 20]
    expected = np.array(cross_encoder_predict(model_dir, QUERY, docs))
    assert (expected < 0).any() or (expected > 1).any(), "identity scores are logits, not probabilities"
    batched, _ = _ours(backend, QUERY, docs, None)
    np.testing.assert_allclose(batched, expected, atol=TOL, rtol=0)


def test_truncation_keeps_the_query_and_cuts_the_document(reranker: object, tiny_reranker_dir: Path) -> None:
    """A cut pair scores as the card does with its max_length (which cuts the end of the user turn)."""
    card = CardQwen3Reranker(tiny_reranker_dir)
    doc = documents_of_lengths(card.tokenizer, [400])[0]
    pair = reranker.encode_pairs([QUERY], [doc])[0]  # type: ignore[attr-defined]
    limit = len(pair) - 150
    cut = pair.truncated(limit)
    assert cut is not None and len(cut) == limit and cut[: cut.head] == pair[: pair.head]
    assert cut[-cut.tail:] == pair[-pair.tail:]
    card.max_length = limit
    expected = card.scores(QUERY, [doc])[0]
    assert abs(reranker.embed([cut])[0, 0] - expected) <= TOL  # type: ignore[attr-defined]
    assert pair.truncated(pair.head + pair.tail - 1) is None  # the query alone does not fit
