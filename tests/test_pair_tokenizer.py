"""The reranker's pair tokenizer: its Rust path gives transformers' ids exactly, saves and rebuilds without
transformers, and falls back to transformers' calls where a Rust copy would differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedding_service.backends.model import pair_tokenizer
from embedding_service.backends.model.facts import read_model_facts
from embedding_service.backends.model.pair_tokenizer import PairTokenizer, TokenPair
from embedding_service.backends.scoring import reranker_facts

QUERIES = ["what is BM25?", "Ünïcödé façade — 東京タワー 😀", "", "capital of China?"]
DOCUMENTS = ["BM25 is a ranking function used by search engines.", "", "word " * 300,
             "[SEP] [CLS] <|im_end|> <|endoftext|> yes no\n\n\ttabs"]


def _layout(pairs: list[TokenPair]) -> list[tuple[list[int], int, int, int | None]]:
    return [(list(p), p.head, p.tail, p.second_start) for p in pairs]


def _reference(model_dir: Path, like: PairTokenizer) -> PairTokenizer:
    """The same tokenizer on transformers' own calls (what every path must equal)."""
    from transformers import AutoTokenizer

    encoding = pair_tokenizer._TransformersPairs(AutoTokenizer.from_pretrained(model_dir))
    return PairTokenizer(encoding, like.facts, vocab_size=like.vocab_size, pad_id=like.pad_id, yes_id=like.yes_id,
                         no_id=like.no_id)


@pytest.fixture(params=["qwen3-reranker", "cross-encoder"])
def model_dir(request: pytest.FixtureRequest, tiny_reranker_dir: Path, cross_encoder_dir: Path) -> Path:
    return tiny_reranker_dir if request.param == "qwen3-reranker" else cross_encoder_dir


def test_the_rust_path_and_its_saved_state_equal_transformers(model_dir: Path) -> None:
    facts = reranker_facts(read_model_facts(model_dir))
    loaded = PairTokenizer.load(str(model_dir), facts)
    assert loaded.direct
    state = loaded.state()
    assert state is not None
    rebuilt = PairTokenizer.from_state(json.loads(json.dumps(state)), facts)
    reference = _reference(model_dir, loaded)
    for instruction in (None, "Find the passage that names a capital"):
        expected = _layout(reference(QUERIES, DOCUMENTS, instruction))
        assert _layout(loaded(QUERIES, DOCUMENTS, instruction)) == expected
        assert _layout(rebuilt(QUERIES, DOCUMENTS, instruction)) == expected
    assert loaded.texts(QUERIES + DOCUMENTS) == rebuilt.texts(QUERIES + DOCUMENTS) == reference.texts(
        QUERIES + DOCUMENTS)
    assert (rebuilt.vocab_size, rebuilt.pad_id, rebuilt.yes_id, rebuilt.no_id) == (
        loaded.vocab_size, loaded.pad_id, loaded.yes_id, loaded.no_id)
    if facts.kind == "yes-no":
        assert loaded.yes_id >= 0 and loaded.no_id >= 0 and loaded.yes_id != loaded.no_id
    else:  # [CLS] q [SEP] d [SEP]: the second segment starts after the first [SEP], one closing token
        first = loaded(["a"], ["b"])[0]
        assert first.second_start == 3 and first.tail == 1


def test_a_state_saved_for_another_kind_is_refused(tiny_reranker_dir: Path, cross_encoder_dir: Path) -> None:
    state = PairTokenizer.load(str(cross_encoder_dir), reranker_facts(read_model_facts(cross_encoder_dir))).state()
    assert state is not None
    with pytest.raises(ValueError, match="cross-encoder reranker"):
        PairTokenizer.from_state(state, reranker_facts(read_model_facts(tiny_reranker_dir)))


def test_a_rust_copy_that_differs_leaves_transformers_path(tiny_reranker_dir: Path, cross_encoder_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The probes catch a Rust tokenizer that is not this model's (standing in for one whose Python side adds
    something): pairs then take transformers' calls, and nothing is saved."""
    from transformers import AutoTokenizer

    from embedding_service.backends.model.tokenization import rust_copy

    other = AutoTokenizer.from_pretrained(cross_encoder_dir)
    monkeypatch.setattr(pair_tokenizer, "rust_copy", lambda tokenizer: rust_copy(other))
    facts = reranker_facts(read_model_facts(tiny_reranker_dir))
    fallback = PairTokenizer.load(str(tiny_reranker_dir), facts)
    assert not fallback.direct and fallback.state() is None
    assert _layout(fallback(QUERIES, DOCUMENTS)) == _layout(_reference(tiny_reranker_dir, fallback)(QUERIES,
                                                                                                    DOCUMENTS))

