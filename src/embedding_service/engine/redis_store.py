"""The result cache's shared store (docs/cache.md): Redis, through the `redis` package (the `redis` extra).

Several instances pointed at one Redis share their results, and they outlive a restart. A Redis that is
slow or down never fails a request: every call has a short timeout, a failure is counted and logged, and
the store is skipped for a few seconds (requests compute as without it) before it is tried again. Entries
are written with SET NX (the first answer stays) and an expiry (`result_cache_redis_ttl_s`); the bytes are
bounded by the Redis server's own `maxmemory` with an LRU policy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from .result_cache import RedisLike

__all__ = ["RedisStore"]

log = logging.getLogger("embedding_service")

TIMEOUT_S = 0.25  # each call, connecting included: a healthy Redis nearby answers in well under 1 ms
PAUSE_S = 5.0  # after a failure, how long requests go without the store before it is tried again


class RedisStore(RedisLike):
    def __init__(self, url: str, ttl_s: float, *, timeout_s: float = TIMEOUT_S, pause_s: float = PAUSE_S) -> None:
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError:  # refused at start (assembly reports it), not at the first request
            raise ImportError("result_cache_redis needs the redis package: pip install 'embedding-service[redis]'"
                              ) from None
        self._client: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
            health_check_interval=0)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.timeout_s = timeout_s
        self.pause_s = pause_s
        self.errors = 0  # failed calls (metrics: embedding_result_cache_redis_errors_total)
        self._paused_until = 0.0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._paused_until

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not self.available:
            return [None] * len(keys)
        try:
            async with asyncio.timeout(2 * self.timeout_s):
                found: list[bytes | None] = await self._client.mget(keys)
            return found
        except Exception as exc:  # any failure of the store: compute instead
            self._failed(exc)
            return [None] * len(keys)

    async def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        if not self.available:
            return
        try:
            async with asyncio.timeout(2 * self.timeout_s):
                pipe = self._client.pipeline(transaction=False)
                for key, value in items:
                    pipe.set(key, value, nx=True, px=self.ttl_ms)
                await pipe.execute()
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self._paused_until = time.monotonic() + self.pause_s
        log.warning("result cache: Redis failed (%s: %s); computing without it for %.0f s", type(exc).__name__,
                    exc, self.pause_s)

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception as exc:  # closing a broken connection: nothing left to do
            log.debug("result cache: closing Redis: %s", exc)
