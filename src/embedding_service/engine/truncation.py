"""Cutting an over-long input to its limit, from either end, keeping the special tokens the model pools on."""

from __future__ import annotations

from ..backends.base import BackendInfo

__all__ = ["keep_end", "keep_start"]


def keep_start(ids: list[int], limit: int, info: BackendInfo) -> list[int]:
    """The start, and the closing special tokens (Qwen3 pools on its end-of-text token)."""
    suffix = list(info.special_suffix)
    if suffix and ids[-len(suffix):] == suffix:
        return [*ids[: limit - len(suffix)], *suffix]
    return ids[:limit]


def keep_end(ids: list[int], limit: int, info: BackendInfo) -> list[int]:
    """The end (its closing special tokens included), and the opening special tokens (BERT's [CLS])."""
    prefix = list(info.special_prefix)
    if prefix and ids[: len(prefix)] == prefix:
        return [*prefix, *ids[len(ids) - (limit - len(prefix)):]]
    return ids[len(ids) - limit:]
