"""Per-client rate limits: requests and input tokens per minute, each a token bucket.

A client is its API key (the auth middleware's id) or, without keys, its address. Requests are charged
here, in ASGI middleware, before the body is read. Tokens are only known after tokenisation, so the
middleware puts a `TokenAdmission` in the scope; the route hands it to the engine, which calls it once
the request's tokens are counted and before the request is queued. So an over-limit request costs a
tokenisation but never a place in the queue or any model compute.

A bucket holds at most one minute's allowance (the burst) and refills continuously. A request larger
than a whole minute's allowance is let through when the bucket is full and leaves it in debt, so such
requests are slowed to the configured average instead of being refused forever.
Limits live in this process: with `workers > 1`, or several replicas, each enforces its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from ...errors import ErrorKind, ServiceError, send_error
from .access import CLIENT_ID_KEY, is_exempt

__all__ = ["TOKEN_ADMISSION_KEY", "RateLimitMiddleware", "RateLimiter", "TokenAdmission", "TokenBucket"]

# Set in the ASGI scope when token limits are on: a TokenAdmission for this request's client.
TOKEN_ADMISSION_KEY = "embedding_service.token_admission"


class TokenBucket:
    """`per_minute` units a minute, at most `per_minute` at once."""

    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, amount: float, now: float) -> float:
        """Take `amount`: 0.0 when granted, else the seconds until it would be."""
        self._refill(now)
        needed = min(amount, self.capacity)
        if self.level >= needed:
            self.level -= amount
            return 0.0
        return (needed - self.level) / self.rate

    def charge(self, amount: float, now: float) -> None:
        """Take `amount` whether or not it is there (the bucket may go into debt)."""
        self._refill(now)
        self.level -= amount

    def wait(self, now: float) -> float:
        """Seconds until the bucket is out of debt (0.0 when it is not in debt)."""
        self._refill(now)
        return 0.0 if self.level > 0 else (1 - self.level) / self.rate

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.level >= self.capacity


class RateLimiter:
    """Buckets per client. Idle (full) buckets are forgotten when there are many clients."""

    def __init__(self, requests_per_minute: int, tokens_per_minute: int, *,
                 clock: Callable[[], float] = time.monotonic, max_clients: int = 100_000) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._clock = clock
        self._max_clients = max_clients
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def charge_request(self, client: str) -> float:
        """0.0 when the request may go on, else seconds to wait."""
        if not self.requests_per_minute:
            return 0.0
        return self._bucket(self._requests, client, self.requests_per_minute).take(1, self._clock())

    def request_wait(self, client: str) -> float:
        """Seconds until `client` could make a request, without charging one."""
        bucket = self._requests.get(client)
        if bucket is None or not self.requests_per_minute:
            return 0.0
        bucket._refill(self._clock())
        return 0.0 if bucket.level >= 1 else (1 - bucket.level) / bucket.rate

    def charge_tokens(self, client: str, tokens: int) -> float:
        if not self.tokens_per_minute:
            return 0.0
        return self._bucket(self._tokens, client, self.tokens_per_minute).take(tokens, self._clock())

    def _bucket(self, buckets: dict[str, TokenBucket], client: str, per_minute: int) -> TokenBucket:
        bucket = buckets.get(client)
        if bucket is None:
            if len(buckets) >= self._max_clients:
                self._forget_idle(buckets)
            bucket = buckets[client] = TokenBucket(per_minute, self._clock())
        return bucket

    def _forget_idle(self, buckets: dict[str, TokenBucket]) -> None:
        """A full bucket is the same as no bucket. If all are busy, drop the oldest half (fail open)."""
        now = self._clock()
        for client in [c for c, b in buckets.items() if b.full(now)]:
            del buckets[client]
        if len(buckets) >= self._max_clients:
            for client in list(buckets)[: len(buckets) // 2]:
                del buckets[client]


def _refusal(what: str, limit: int, wait_s: float) -> ServiceError:
    retry_after = max(1, math.ceil(wait_s))
    return ServiceError(ErrorKind.RATE_LIMITED,
                        f"rate limit reached: {limit} {what} per minute for this client; "
                        f"retry after {retry_after}s",
                        code="rate_limit_exceeded", retry_after_s=retry_after)


class TokenAdmission:
    """Called by the engine with a request's token count once it is known; raises 429 over the limit."""

    def __init__(self, limiter: RateLimiter, client: str) -> None:
        self.limiter = limiter
        self.client = client

    def __call__(self, tokens: int) -> None:
        wait_s = self.limiter.charge_tokens(self.client, tokens)
        if wait_s > 0:
            raise _refusal("input tokens", self.limiter.tokens_per_minute, wait_s)

    def check(self) -> None:
        """Before any tokenising: 429 while this client's token bucket is in debt."""
        wait_s = self.limiter._bucket(self.limiter._tokens, self.client, self.limiter.tokens_per_minute).wait(
            self.limiter._clock())
        if wait_s > 0:
            raise _refusal("input tokens", self.limiter.tokens_per_minute, wait_s)

    def charge(self, tokens: int) -> None:
        """A request refused as too long still costs its tokens (a lower bound): refusals are not free."""
        self.limiter._bucket(self.limiter._tokens, self.client, self.limiter.tokens_per_minute).charge(
            tokens, self.limiter._clock())


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, limiter: RateLimiter, exempt_paths: Sequence[str]) -> None:
        self.app = app
        self.limiter = limiter
        self.exempt_paths = tuple(exempt_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_exempt(scope["path"], self.exempt_paths):
            await self.app(scope, receive, send)
            return
        client = scope.get(CLIENT_ID_KEY) or "addr-" + str((scope.get("client") or ("unknown",))[0])
        wait_s = self.limiter.charge_request(client)
        if wait_s > 0:
            await send_error(send, _refusal("requests", self.limiter.requests_per_minute, wait_s))
            return
        if self.limiter.tokens_per_minute:
            scope[TOKEN_ADMISSION_KEY] = TokenAdmission(self.limiter, client)
        await self.app(scope, receive, send)
