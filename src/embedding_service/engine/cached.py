"""A request's sequences through the result cache (result_cache.py): hits from memory, then Redis; only the
misses go to the batcher, each distinct sequence once; what was computed is stored for the next request.

The value is each row's bytes as the backend produced it: an embedding's or a reranker's float32 row, a sparse
vector's indices and values (sparse.py); the key is the ids the model sees (a pair's with its token-type split).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import numpy as np

from .result_cache import ModelCache

__all__ = ["FLOAT32_ROWS", "RowCodec", "Submit", "through_cache"]

# The engine's submit: sequences -> (rows, queue seconds, compute seconds).
Submit = Callable[[Sequence[Sequence[int]]], Awaitable[tuple[np.ndarray, float, float]]]


class RowCodec:
    """How a task's rows are kept: the backend's rows -> each row's bytes, and the bytes back -> rows. The
    default: float32 rows (embeddings; a reranker's scores, one float a row)."""

    def encode(self, rows: np.ndarray) -> list[bytes]:
        return [row.tobytes() for row in np.ascontiguousarray(rows, dtype=np.float32).reshape(len(rows), -1)]

    def decode(self, values: list[bytes]) -> np.ndarray:
        joined = bytearray().join(values)  # (writable: a cached vector may be cut and renormalised after)
        return np.frombuffer(joined, dtype=np.float32).reshape(len(values), -1)


FLOAT32_ROWS = RowCodec()


async def through_cache(cache: ModelCache, seqs: Sequence[Sequence[int]], submit: Submit, client: str | None = None,
                        *, keyed: Sequence[Sequence[int]] | None = None, codec: RowCodec = FLOAT32_ROWS
                        ) -> tuple[np.ndarray, float, float, int]:
    """The rows of `seqs`, queue and compute seconds of the misses' batch, and how many inputs the cache
    answered. A request answered whole never reaches the batcher. `client`: the caller's id, for a per-key
    cache; `keyed`: what each key hashes, where it is more than the ids (default `seqs`)."""
    keys = cache.keys(seqs if keyed is None else keyed, client)
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
        computed = dict(zip((keys[i] for i in todo), codec.encode(rows), strict=True))
        for i in missing:
            found[i] = computed[keys[i]]
        await cache.put(list(computed.items()))
    return codec.decode(cast(list[bytes], found)), queued, compute, len(seqs) - len(missing)
