"""The exact result cache (docs/cache.md): a model's vector for a token-id sequence, kept as the bytes the
engine produced, so that the same ids on the same model and settings answer without a forward, byte for byte.

One `ResultCache` per process: a memory LRU bounded in bytes (keys, values and an estimate of each entry's
Python overhead) shared by every model, and optionally a Redis store (redis_store.py) shared by instances.
Each model reads and writes it through its `ModelCache`, whose namespace (the model's fingerprint,
cache_fingerprint.py, with the dtype and device the backend reports) is mixed into every key: two models or
two numerics never share an entry. Used on the event loop only (no lock).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ..backends.base import BackendInfo

__all__ = ["ENTRY_OVERHEAD", "CacheStats", "ModelCache", "ResultCache"]

# Python's own cost of one entry beyond its key and value bytes: the two bytes objects' headers (33 each) and
# the OrderedDict's slot, link and value tuple (~126, tracemalloc over 20,000 entries): ~192, rounded up, so
# that a bound of N bytes holds for small vectors too.
ENTRY_OVERHEAD = 220
DIGEST_BYTES = 32  # blake2b-256 of the ids: a collision is out of reach (2^-128 for 2^64 entries)


@dataclass
class CacheStats:
    """One model's counters (metrics read them at scrape time): inputs answered from memory or Redis,
    inputs computed, entries evicted, and the bytes and entries it holds in memory."""

    hits: int = 0
    redis_hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


class ResultCache:
    """The process's cache: a byte-bounded LRU (`max_bytes`; 0 = keep nothing) and an optional Redis store."""

    def __init__(self, max_bytes: int, redis: RedisLike | None = None, *, per_key: bool = False) -> None:
        self.max_bytes = max_bytes
        self.redis = redis
        self.per_key = per_key  # each client (API key) its own entries: keys() mixes its id in
        self.bytes = 0
        self._entries: OrderedDict[bytes, tuple[bytes, CacheStats]] = OrderedDict()

    def for_model(self, fingerprint: str) -> ModelCache:
        return ModelCache(self, fingerprint)

    def get(self, key: bytes) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: bytes, value: bytes, stats: CacheStats) -> None:
        """Keep `value` unless an entry is there already (the first answer stays: two identical requests
        in flight at once both compute, and every later hit gets the first one stored)."""
        size = len(key) + len(value) + ENTRY_OVERHEAD
        if key in self._entries or size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            old_key, (old_value, owner) = self._entries.popitem(last=False)
            freed = len(old_key) + len(old_value) + ENTRY_OVERHEAD
            self.bytes -= freed
            owner.bytes -= freed
            owner.entries -= 1
            owner.evictions += 1
        self._entries[key] = (value, stats)
        self.bytes += size
        stats.bytes += size
        stats.entries += 1


class RedisLike:
    """What the cache needs of a shared store (redis_store.RedisStore): many keys at once, never raising."""

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        raise NotImplementedError

    async def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Close its connections (a later call opens new ones)."""


class ModelCache:
    """One model's view of the cache: its keys, its counters."""

    def __init__(self, cache: ResultCache, fingerprint: str) -> None:
        self.cache = cache
        self.fingerprint = fingerprint
        self.stats = CacheStats()
        self._namespace: bytes | None = None
        self._prefix = b""

    def bind(self, info: BackendInfo) -> None:
        """Mix in what only the loaded backend knows (the dtype and device it runs), once."""
        if self._namespace is None:
            seed = f"{self.fingerprint}|{info.engine}|{info.dtype}|{info.device}|{info.dimension}|{info.task}"
            self._namespace = hashlib.blake2b(seed.encode(), digest_size=16).digest()
            self._prefix = b"es:rc1:" + self._namespace.hex().encode() + b":"

    def keys(self, seqs: Sequence[Sequence[int]], client: str | None = None) -> list[bytes]:
        """Each sequence's key: blake2b-256 of its ids (int32), keyed by the model's namespace (and, with
        per_key, by the client's id: `key-<digest>` of its API key; None without keys)."""
        assert self._namespace is not None, "bind() the loaded model's info first"
        ns = self._namespace
        if self.cache.per_key and client is not None:
            ns = hashlib.blake2b(ns + client.encode(), digest_size=32).digest()
        return [hashlib.blake2b(array("i", ids).tobytes(), digest_size=DIGEST_BYTES, key=ns).digest()
                for ids in seqs]

    def redis_key(self, key: bytes) -> bytes:
        return self._prefix + key.hex().encode()

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """From memory: each key's vector bytes, or None."""
        get = self.cache.get
        return [get(key) for key in keys]

    async def get_shared(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """From Redis (None for each where it is off, down or lacks the key); what it has goes into memory."""
        redis = self.cache.redis
        if redis is None or not keys:
            return [None] * len(keys)
        found = await redis.get_many([self.redis_key(key) for key in keys])
        for key, value in zip(keys, found, strict=True):
            if value is not None:
                self.cache.put(key, value, self.stats)
        return found

    async def put(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        cache, stats = self.cache, self.stats
        for key, value in items:
            cache.put(key, value, stats)
        if cache.redis is not None and items:
            await cache.redis.put_many([(self.redis_key(key), value) for key, value in items])
