"""An API process's view of engines that run in the engine process (`api_processes > 1`).

A `RemoteEmbeddingEngine` is an `EmbeddingEngine` whose batcher is elsewhere: the API process prompts,
tokenises (with its own copy of the model's tokenizer), checks the limits and admits the request exactly as
one process does (engine/inputs.py), then `submit` sends the token ids to the engine process over the
`EngineLink` (one Unix socket per API process, engine/wire.py) and awaits the rows. The engine's queue
bounds, timeouts and failures come back as the same ServiceErrors, so every route answers as it does in one
process. A `RemoteRerankEngine` does the same for a reranker's pairs (tokenised and fitted here; their
token-type split travels with the ids). The link's end (the engine process gone) or a model's death there
turns the model unhealthy here and calls `on_dead`, as a local engine's death does: the API process answers
503 and exits.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np

from ..backends.base import BackendDeadError, BackendInfo
from ..backends.fake.embed import FakeBackend
from ..backends.fake.scoring import FakeScoringBackend
from ..backends.model.pair_tokenizer import PairTokenizer, TokenPair
from ..backends.model.tokenization import HfTokenizer, SavedTokenizer
from ..errors import ErrorKind, ServiceError
from . import wire
from .core import EngineCore
from .engine import EmbeddingEngine
from .options import EngineOptions
from .rerank import RerankEngine
from .result_cache import ModelCache
from .types import EngineState

__all__ = ["EngineLink", "RemoteEmbeddingEngine", "RemoteRerankEngine", "TokenizerOnly", "tokenizer_recipe"]

log = logging.getLogger("embedding_service")


def tokenizer_recipe(backend: Any) -> tuple[str, Any]:
    """How an API process gets the same token ids as `backend` (loaded): ("fake", (vocab, eos)), ("saved",
    a SavedTokenizer's state: the checked Rust encoder, no transformers), ("hf", None): load the model
    folder's tokenizer with transformers; a reranker's: ("pairs", (its PairTokenizer's state or None, facts))
    or ("fake-pairs", None)."""
    active = getattr(backend, "active", backend)  # (backends/runtime/fallback.py: the backend that loaded)
    if isinstance(active, FakeBackend):
        return "fake", (active.vocab_size, active.eos_token_id)
    if isinstance(active, FakeScoringBackend):
        return "fake-pairs", None
    pairs = getattr(active, "pairs", None)
    if isinstance(pairs, PairTokenizer):  # a reranker's
        return "pairs", (pairs.state(), pairs.facts)
    state = getattr(getattr(active, "decoder", None), "state", lambda: None)()
    return ("saved", state) if state is not None else ("hf", None)


class TokenizerOnly:
    """The backend of a remote engine: the model's tokenizer, no model (`embed` is the engine process's)."""

    def __init__(self, recipe: tuple[str, Any], model_dir: str) -> None:
        kind, detail = recipe
        self.decoder: Any = None
        self._pairs: Callable[..., list[TokenPair]] | None = None
        if kind == "fake":
            vocab_size, eos = detail
            self._tokenize: Callable[[Sequence[str]], list[list[int]]] = FakeBackend(
                vocab_size=vocab_size, eos_token_id=eos).tokenize
        elif kind == "fake-pairs":
            scorer = FakeScoringBackend()
            self._tokenize, self._pairs = scorer.tokenize, scorer.encode_pairs
        elif kind == "pairs":
            state, facts = detail
            pairs = PairTokenizer.from_state(state, facts) if state else PairTokenizer.load(model_dir, facts)
            self._tokenize, self._pairs = pairs.texts, pairs
        else:
            self.decoder = SavedTokenizer(detail) if kind == "saved" else HfTokenizer(model_dir)
            self._tokenize = self.decoder

    def encode_pairs(self, queries: Sequence[str], documents: Sequence[str],
                     instruction: str | None = None) -> list[TokenPair]:
        assert self._pairs is not None, "not a reranker's tokenizer"
        return self._pairs(queries, documents, instruction)

    def load(self) -> BackendInfo:
        raise RuntimeError("a remote engine's model loads in the engine process")

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tokenize(texts)

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        raise RuntimeError("a remote engine embeds in the engine process")

    def close(self) -> None:
        pass


class _NotLoaded(TokenizerOnly):
    def __init__(self) -> None:
        self.decoder = None

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        raise RuntimeError("not loaded")


class EngineLink:
    """This API process's connection to the engine process: requests by id, answers matched back."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.engines: list[_RemoteCore] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[np.ndarray, float, float]]] = {}
        self._channel: wire.Channel | None = None
        self._closed = False
        self._models: asyncio.Future[list[tuple[BackendInfo, tuple[str, Any]]]] | None = None
        self._connecting: asyncio.Task[None] | None = None

    async def model(self, index: int) -> tuple[BackendInfo, tuple[str, Any]]:
        """The model's facts and tokenizer recipe, once the engine process has loaded every model and every
        API process has connected (connects on first use)."""
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        await asyncio.shield(self._connecting)
        assert self._models is not None
        return (await asyncio.shield(self._models))[index]

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        self._models = loop.create_future()
        _, self._channel = await loop.create_unix_connection(lambda: wire.Channel(self._on_frame, self._on_lost),
                                                             self.path)
        self._channel.put(wire.message(wire.HELLO, {"pid": os.getpid()}))

    def _on_frame(self, kind: int, payload: bytes) -> None:
        if kind == wire.ROWS:
            request_id, rows, queued, compute = wire.decode_rows(payload)
            self._answer(request_id, (rows, queued, compute))
        elif kind == wire.ERROR:
            request_id, exc = wire.decode_error(payload)
            self._answer(request_id, exc)
        elif kind == wire.MODELS:
            assert self._models is not None
            if not self._models.done():
                self._models.set_result(wire.content(payload))
        elif kind == wire.STATE:
            for index, death in wire.content(payload).items():
                self.engines[index].engine_died(death)

    def _on_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self._lost(f"the engine process is gone ({type(exc).__name__ if exc else 'connection closed'})")

    def _answer(self, request_id: int, outcome: Any) -> None:
        future = self._pending.pop(request_id, None)
        if future is None or future.done():
            return  # (cancelled meanwhile)
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def _lost(self, why: str) -> None:
        log.error("%s: every model here is unavailable", why)
        for engine in self.engines:
            engine.engine_died(f"model '{engine.name}': {why}")
        if self._models is not None and not self._models.done():
            self._models.set_exception(ServiceError(ErrorKind.UNHEALTHY, why, code="engine_unhealthy"))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ServiceError(ErrorKind.UNHEALTHY, "the embedding engine died",
                                                  code="engine_unhealthy"))
        self._pending.clear()

    async def submit(self, index: int, seqs: Sequence[Sequence[int]], seconds_left: float
                     ) -> tuple[np.ndarray, float, float]:
        channel = self._channel
        if channel is None or channel.closing:
            raise ServiceError(ErrorKind.UNHEALTHY, "the embedding engine is unavailable", code="engine_unhealthy")
        request_id = next(self._ids)
        future: asyncio.Future[tuple[np.ndarray, float, float]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        channel.put(wire.encode_submit(request_id, index, seqs, seconds_left))
        try:  # (the engine process answers a timeout itself, and a dead one closes the connection)
            return await future
        except BaseException:
            if self._pending.pop(request_id, None) is not None and not channel.closing:
                channel.put(wire.encode_cancel(request_id))  # the client hung up
            raise

    async def close(self) -> None:
        self._closed = True
        if self._channel is not None:
            self._channel.close()


class _RemoteCore(EngineCore):
    """What every task's remote engine changes of the core: the load (facts from the engine process, the
    tokenizer here), submit (over the link), a death told by the engine process, and stop."""

    _link: EngineLink
    _index: int
    _model_dir: str

    def _attach(self, link: EngineLink, index: int, model_dir: str) -> None:
        self._link, self._index, self._model_dir = link, index, model_dir
        self.queue_here = False
        link.engines.append(self)

    async def _load_model(self) -> BackendInfo:
        """The model's facts from the engine process, and its tokenizer built here (up to a second: off the
        event loop, which answers /health meanwhile). The core's batcher is built but never fed."""
        try:
            info, recipe = await self._link.model(self._index)
            loop = asyncio.get_running_loop()
            self.backend = await loop.run_in_executor(self._compute, TokenizerOnly, recipe, self._model_dir)
        finally:
            self._load_busy = False
        return info

    async def submit(self, seqs: Sequence[Sequence[int]], deadline: float | None = None
                     ) -> tuple[np.ndarray, float, float]:
        if self.state is EngineState.UNHEALTHY:
            self.check_ready()
        left = self.options.request_timeout_s if deadline is None else max(0.001, deadline - time.monotonic())
        return await self._link.submit(self._index, seqs, left)

    def engine_died(self, death: str) -> None:
        """The model died in the engine process (or the link is gone): unhealthy, and the server exits."""
        if self.state is not EngineState.UNHEALTHY:
            self.death = death
        self.state = EngineState.UNHEALTHY
        if self.on_dead is not None:
            callback, self.on_dead = self.on_dead, None
            callback(BackendDeadError(death))

    async def stop(self) -> None:
        await super().stop()
        await self._link.close()


class RemoteEmbeddingEngine(_RemoteCore, EmbeddingEngine):
    """An embedding engine whose model and batcher are in the engine process (module docstring). Its
    `result_cache` is this API process's: a hit answers here, and only the misses cross the link."""

    def __init__(self, link: EngineLink, index: int, options: EngineOptions, model_dir: str,
                 result_cache: ModelCache | None = None) -> None:
        EmbeddingEngine.__init__(self, _NotLoaded(), options, result_cache)
        self._attach(link, index, model_dir)


class RemoteRerankEngine(_RemoteCore, RerankEngine):
    """A reranker whose model and batcher are in the engine process: pairs are tokenised and fitted here."""

    def __init__(self, link: EngineLink, index: int, options: EngineOptions, model_dir: str, *,
                 max_documents: int, result_cache: ModelCache | None = None) -> None:
        RerankEngine.__init__(self, _NotLoaded(), options, max_documents=max_documents, result_cache=result_cache)
        self._attach(link, index, model_dir)

    async def _load_model(self) -> BackendInfo:
        info = await super()._load_model()
        self.pair_backend = cast(TokenizerOnly, self.backend)
        return info
