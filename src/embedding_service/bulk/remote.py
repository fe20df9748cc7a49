"""Bulk embedding through running OpenAI-compatible servers (`--url`, repeatable: they share the work).

Every server gets `concurrency` workers pulling requests from one queue, so a faster server takes more.
Connection errors, timeouts, 429 and 5xx-unavailable answers are retried with exponential backoff (or the
server's Retry-After), the request going back to the queue for any server; any other 4xx stops the job, naming
the row the server refused.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .local import BulkRowError, EmbedOptions

__all__ = ["HttpEmbedder", "Pending", "RemoteError", "ServerPool"]

log = logging.getLogger("embedding_service")

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_INPUT_INDEX = re.compile(r"input\[(\d+)\]")


class RemoteError(RuntimeError):
    """The servers cannot do the job (unreachable after all retries, disagreeing models, a 5xx that persists)."""


@dataclass(kw_only=True)
class Pending:
    """A request waiting for a server: any server's worker may take it, and take it again after a retry."""

    future: asyncio.Future[Any]
    attempts: int = 0
    retry_after: str | None = None  # the last 429/503's Retry-After


@dataclass(kw_only=True)
class _Request(Pending):
    start: int  # first text's index in the chunk
    texts: list[str]


class ServerPool:
    """`concurrency` workers per server pulling Pending requests from one queue; `_post` (a subclass's) answers
    one, returning None to have it retried (by any server) after a backoff."""

    def __init__(self, urls: list[str], *, api_key: str | None = None, concurrency: int = 4, retries: int = 8,
                 timeout_s: float = 300.0, max_backoff_s: float = 30.0) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.api_key = api_key
        self.concurrency = concurrency
        self.retries = retries
        self.timeout_s = timeout_s
        self.max_backoff_s = max_backoff_s
        self._queue: asyncio.Queue[Pending] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._client: Any = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def served_models(self, model: str | None = None) -> str:
        """The model the servers serve (they must agree)."""
        import httpx

        names: dict[str, str] = {}
        with httpx.Client(headers=self._headers(), timeout=30.0) as client:
            for url in self.urls:
                names[url] = self._model_of(client, url, model)
        if len(set(names.values())) > 1:
            listed = ", ".join(f"{name} at {url}" for url, name in names.items())
            raise RemoteError(f"the servers serve different models ({listed}); give servers of one model")
        return next(iter(names.values()))

    def _model_of(self, client: Any, url: str, model: str | None) -> str:
        import httpx

        for attempt in range(self.retries + 1):
            try:
                response = client.get(url + "/models")
            except httpx.HTTPError as exc:
                if attempt == self.retries:
                    raise RemoteError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
                self._sleep_sync(attempt)
                continue
            if response.status_code in _RETRY_STATUS and attempt < self.retries:
                self._sleep_sync(attempt)
                continue
            if response.status_code != 200:
                raise RemoteError(f"{url}/models answered {response.status_code}: {response.text[:200]}")
            data = response.json().get("data") or [{}]
            return str(data[0].get("id") or model or "unknown")
        raise AssertionError("unreachable")

    def _sleep_sync(self, attempt: int) -> None:
        import time

        time.sleep(self._backoff(attempt))

    def _backoff(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.max_backoff_s)
            except ValueError:
                pass
        return min(self.max_backoff_s, 0.25 * 2**attempt) * random.uniform(0.5, 1.0)

    async def start(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency * len(self.urls) + 4)
        self._client = httpx.AsyncClient(headers=self._headers(), timeout=httpx.Timeout(self.timeout_s),
                                         limits=limits)
        for url in self.urls:
            for _ in range(self.concurrency):
                self._workers.append(asyncio.create_task(self._work(url)))

    async def _work(self, url: str) -> None:
        failures = 0  # this server's consecutive failures: a down server backs off, others go on
        while True:
            request = await self._queue.get()
            if request.future.done():
                continue
            try:
                outcome = await self._post(url, request)
            except Exception as exc:  # a bug or a refusal: fail this request, the job stops
                if not request.future.done():
                    request.future.set_exception(exc)
                continue
            if outcome is None:  # retryable: back to the queue for any server
                request.attempts += 1
                failures += 1
                self._queue.put_nowait(request)
                await asyncio.sleep(self._backoff(failures - 1, request.retry_after))
            else:
                failures = 0
                if not request.future.done():
                    request.future.set_result(outcome)

    async def _post(self, url: str, request: Any) -> Any:
        raise NotImplementedError

    def _retry_or_fail(self, request: Pending, why: str) -> None:
        if request.attempts >= self.retries:
            raise RemoteError(f"giving up after {request.attempts + 1} attempts: {why}")
        log.warning("retrying (%d/%d): %s", request.attempts + 1, self.retries, why)

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()


class HttpEmbedder(ServerPool):
    shaped = False  # dense vectors only: sparse and token vectors are written by the model in this process

    def __init__(self, urls: list[str], options: EmbedOptions, *, api_key: str | None = None,
                 model: str | None = None, batch_size: int = 64, concurrency: int = 4, retries: int = 8,
                 timeout_s: float = 300.0, max_backoff_s: float = 30.0) -> None:
        super().__init__(urls, api_key=api_key, concurrency=concurrency, retries=retries, timeout_s=timeout_s,
                         max_backoff_s=max_backoff_s)
        self.options = options
        self.model = model
        self.batch_size = batch_size
        self.dimension: int | None = None
        self._served: str | None = None

    @property
    def pipeline_depth(self) -> int:
        # Enough chunks in flight that no server idles at a chunk boundary.
        return 2 + (len(self.urls) * self.concurrency) // 8

    def fingerprint(self) -> dict[str, Any]:
        """The model the servers serve (they must agree), and the request options."""
        self._served = self.served_models(self.model)
        return {"mode": "http", "model": self.model or self._served, "instruction": self.options.instruction,
                "prompt_name": self.options.prompt_name, "dimensions": self.options.dimensions}

    async def embed(self, texts: list[str], on_progress: Callable[[int], None]) -> tuple[np.ndarray, int]:
        loop = asyncio.get_running_loop()
        requests = [_Request(start=start, texts=texts[start : start + self.batch_size], future=loop.create_future())
                    for start in range(0, len(texts), self.batch_size)]
        for request in requests:
            request.future.add_done_callback(_count_done(on_progress, len(request.texts)))
            self._queue.put_nowait(request)
        results = await asyncio.gather(*(r.future for r in requests))
        if not results:
            return np.zeros((0, self.dimension or 0), np.float32), 0
        return np.concatenate([v for v, _ in results]), sum(t for _, t in results)

    async def _post(self, url: str, request: _Request) -> tuple[np.ndarray, int] | None:
        import httpx

        payload: dict[str, Any] = {"input": request.texts, "encoding_format": "base64",
                                   "model": self.model or self._served or "default"}
        for key in ("instruction", "prompt_name", "dimensions"):
            if getattr(self.options, key) is not None:
                payload[key] = getattr(self.options, key)
        try:
            response = await self._client.post(url + "/embeddings", json=payload)
        except httpx.HTTPError as exc:  # connection refused/reset, timeouts
            self._retry_or_fail(request, f"{url}: {type(exc).__name__}: {exc}")
            return None
        if response.status_code == 200:
            body = response.json()
            data = sorted(body["data"], key=lambda item: item["index"])
            if any(not isinstance(d.get("embedding"), str) for d in data):
                raise RemoteError(f"{url} answered {data[0].get('object')} items, not dense vectors: bulk over "
                                  "--url writes dense vectors; embed with a sparse or multi-vector model in this "
                                  "process (--model-path)")
            vectors = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
            if len(vectors) != len(request.texts):
                raise RemoteError(f"{url} answered {len(vectors)} vectors for {len(request.texts)} inputs")
            self.dimension = vectors.shape[1]
            return vectors, int(body.get("usage", {}).get("prompt_tokens", 0))
        text = response.text[:300]
        if response.status_code in _RETRY_STATUS:
            request.retry_after = response.headers.get("retry-after")
            self._retry_or_fail(request, f"{url} answered {response.status_code}: {text}")
            return None
        message = _error_message(response)
        match = _INPUT_INDEX.search(message)
        index = request.start + int(match.group(1)) if match else request.start
        where = "" if match else f" (request of rows {request.start}-{request.start + len(request.texts) - 1})"
        raise BulkRowError(index, f"the server refused it ({response.status_code}{where}): {message}")


def _count_done(on_progress: Callable[[int], None], count: int) -> Callable[[asyncio.Future[Any]], None]:
    def done(future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            on_progress(count)

    return done


def _error_message(response: Any) -> str:
    try:
        return str(response.json()["error"]["message"])
    except Exception:
        return response.text[:300]
