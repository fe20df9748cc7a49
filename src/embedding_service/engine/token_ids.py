"""Token-id inputs: the one range check (model ids, or tiktoken ids in api/embed/tiktoken_ids.py), and the
special tokens the tokenizer would have added."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ErrorKind, ServiceError

__all__ = ["check_token_ids", "with_special_tokens"]


def check_token_ids(token_ids: Sequence[Sequence[int]], vocab_size: int, *, flat: bool, vocabulary: str,
                    hint: str = "") -> None:
    """400 naming the first id outside 0..vocab_size-1 (`flat`: the input was one list, so input[pos])."""
    for index, ids in enumerate(token_ids):
        for pos, value in enumerate(ids):
            if not 0 <= value < vocab_size:
                where = f"input[{pos}]" if flat else f"input[{index}][{pos}]"
                raise ServiceError(ErrorKind.INVALID_REQUEST,
                                   f"{where} is token id {value}, outside {vocabulary} (0..{vocab_size - 1}){hint}",
                                   param="input", code="invalid_token_id")


def with_special_tokens(ids: list[int], prefix: tuple[int, ...], suffix: tuple[int, ...]) -> list[int]:
    """Token-id input as the tokenizer would have produced it: add missing leading/trailing specials."""
    out = list(ids)
    if prefix and tuple(out[: len(prefix)]) != prefix:
        out = [*prefix, *out]
    if suffix and tuple(out[-len(suffix):]) != suffix:
        out = [*out, *suffix]
    return out
