"""The Hugging Face tokenizer every backend uses, so that text becomes the same token ids on every engine.

The engine tokenises once (off the event loop) and hands ids to `Backend.embed`; vLLM receives those ids
as-is, so its own tokenizer never runs on request text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["HfTokenizer", "special_tokens_added"]


def special_tokens_added(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids a tokenizer's post-processor puts before and after every text."""
    probe = "hello world"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(full[:start]), tuple(full[start + len(plain) :])
    return (), ()


class HfTokenizer:
    """`AutoTokenizer` of a model directory: untruncated ids with special tokens, plus what those are."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self.special_prefix, self.special_suffix = special_tokens_added(self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=False, padding=False,
                                 return_attention_mask=False, return_token_type_ids=False, verbose=False)
        return [list(ids) for ids in encoded["input_ids"]]
