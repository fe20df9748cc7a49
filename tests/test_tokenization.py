"""The shared tokenizer: the direct Rust path gives transformers' ids, and two threads may call it at once."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from embedding_service.backends.model.tokenization import HfTokenizer, SavedTokenizer, transformers_ids


def _texts(count: int, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    pieces = ["the", "Qwen3", "naïve", "東京", "😀", "BM25?", "[SEP]", "<|endoftext|>", "  ", "\n", "x" * 40,
              "don't", "e-mail", "1,234.5", "ﬁne", "\t"]
    return [" ".join(rng.choice(pieces) for _ in range(rng.randint(0, 60))) for _ in range(count)]


@pytest.fixture(params=["minilm", "qwen3"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    fixture = "minilm_dir" if request.param == "minilm" else "tiny_qwen_dir"
    return Path(request.getfixturevalue(fixture))


def test_direct_path_is_used_and_equals_transformers(model_dir: Path) -> None:
    tokenizer = HfTokenizer(str(model_dir))
    assert tokenizer.direct  # both models' fast tokenizers pass the probe check
    texts = _texts(300)
    expected = transformers_ids(tokenizer.tokenizer, texts)
    assert tokenizer(texts) == expected
    assert [tokenizer([text])[0] for text in texts[:50]] == expected[:50]  # the one-text path too
    assert any(len(ids) > 20 for ids in expected) and len({tuple(ids) for ids in expected}) > 250


def test_saved_tokenizer_gives_the_same_ids_and_facts(model_dir: Path) -> None:
    """What a cached openvino export serves with: its state survives JSON and gives transformers' ids."""
    import json

    tokenizer = HfTokenizer(str(model_dir))
    state = tokenizer.state()
    assert state is not None
    saved = SavedTokenizer(json.loads(json.dumps(state)))
    texts = _texts(200, seed=13)
    assert saved(texts) == transformers_ids(tokenizer.tokenizer, texts)
    assert [saved([text])[0] for text in texts[:30]] == tokenizer(texts[:30])
    assert (saved.special_prefix, saved.special_suffix, saved.vocab_size, saved.pad_id) == (
        tokenizer.special_prefix, tokenizer.special_suffix, tokenizer.vocab_size, tokenizer.pad_id)
    tokenizer._direct = None  # a tokenizer that takes transformers' path has nothing to save
    assert tokenizer.state() is None


def test_fallback_path_equals_transformers(model_dir: Path) -> None:
    tokenizer = HfTokenizer(str(model_dir))
    tokenizer._direct = None  # as when the probe check fails
    texts = _texts(100, seed=9)
    assert tokenizer(texts) == transformers_ids(tokenizer.tokenizer, texts)


@pytest.mark.parametrize("direct", [True, False])
def test_two_threads_may_tokenize_at_once(minilm_dir: Path, direct: bool) -> None:
    """The engine tokenises on the event loop and on its tokenizer thread: calls overlap."""
    tokenizer = HfTokenizer(str(minilm_dir))
    if not direct:
        tokenizer._direct = None
    texts = _texts(64, seed=11)
    expected = tokenizer(texts)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: tokenizer(texts), range(40)))
    assert all(result == expected for result in results)
