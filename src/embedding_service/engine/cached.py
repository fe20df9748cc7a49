"""A request's sequences through the result cache (result_cache.py): hits from memory, then Redis; only the
misses go to the batcher, each distinct sequence once; what was computed is stored for the next request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import numpy as np

from .result_cache import ModelCache

__all__ = ["Submit", "through_cache"]

# The engine's submit: sequences -> (rows, queue seconds, compute seconds).
Submit = Callable[[Sequence[Sequence[int]]], Awaitable[tuple[np.ndarray, float, float]]]


async def through_cache(cache: ModelCache, seqs: Sequence[Sequence[int]], submit: Submit,
                        client: str | None = None) -> tuple[np.ndarray, float, float, int]:
    """The rows of `seqs` (float32, writable), queue and compute seconds of the misses' batch, and how many
    inputs the cache answered. A request answered whole never reaches the batcher. `client`: the caller's
    id, for a per-key cache."""
    keys = cache.keys(seqs, client)
    found = cache.get(keys)
    missing = [i for i, value in enumerate(found) if value is None]
    stats = cache.stats
    stats.hits += len(seqs) - len(missing)
    if missing and cache.cache.redis is not None:
        shared = await cache.get_shared([keys[i] for i in missing])
        for i, value in zip(missing, shared, strict=True):
            found[i] = value
        still = [i for i in missing if found[i] is None]
        stats.redis_hits += len(missing) - len(still)
        stats.hits += len(missing) - len(still)
        missing = still
    stats.misses += len(missing)
    queued = compute = 0.0
    if missing:
        first: dict[bytes, int] = {}  # a text sent twice in one request is computed once
        for i in missing:
            first.setdefault(keys[i], i)
        todo = list(first.values())
        rows, queued, compute = await submit([seqs[i] for i in todo])
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        computed = {keys[i]: row.tobytes() for i, row in zip(todo, rows, strict=True)}
        for i in missing:
            found[i] = computed[keys[i]]
        await cache.put(list(computed.items()))
    joined = bytearray().join(cast(list[bytes], found))
    return np.frombuffer(joined, dtype=np.float32).reshape(len(seqs), -1), queued, compute, len(seqs) - len(missing)
