"""The task-neutral engine core: one model's lifecycle (load, ready, drain, death), admission, the tokenizer
thread, the token-budget batcher and the batch hook that metrics read. Every task is built on it: embedding
(engine.py) and rerank (rerank.py) say how a request becomes token sequences and how the model's rows become
results, and hand the sequences to `submit`; nothing else of the core is theirs to touch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from .. import tracing
from ..backends.base import Backend, BackendDeadError, BackendInfo
from ..errors import ErrorKind, ServiceError
from .batcher import Batcher, BatchPolicy
from .cached import FLOAT32_ROWS, RowCodec, through_cache
from .options import EngineOptions
from .priority import in_background
from .result_cache import ModelCache
from .types import EngineState

__all__ = ["EngineCore", "EngineOptions", "invalid_unicode"]

log = logging.getLogger("embedding_service")
T = TypeVar("T")


def invalid_unicode(exc: UnicodeError, param: str) -> ServiceError:
    """The 400 for text a tokenizer could not read (lone surrogates and the like)."""
    return ServiceError(ErrorKind.INVALID_REQUEST, f"input is not valid Unicode text: {exc}", param=param)


class EngineCore:
    """Owns a backend. `start()` loads it in the background; a task's requests are served once healthy."""

    def __init__(self, backend: Backend, options: EngineOptions) -> None:
        self.backend = backend
        self.options = options
        self.state = EngineState.LOADING
        self.info: BackendInfo | None = None
        self.load_error: BaseException | None = None
        self.load_seconds: float | None = None
        self.death: str | None = None  # which model died and why, once its backend died
        self.batch_policy: BatchPolicy | None = None  # set by start(), from the options and the loaded model
        self.on_batch: Callable[[int, int, float], None] | None = None
        # Called (on the event loop) once when the backend dies: the server exits for its supervisor.
        self.on_dead: Callable[[BaseException], None] | None = None
        self.batches_running = 0  # inside backend.embed, on the compute threads
        self.queue_here = True  # the batcher's queue is this process's (not an API process's proxy: remote.py)
        self.result_cache: ModelCache | None = None  # a task that can answer from it sets it (docs/cache.md)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._batcher: Batcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._active_requests = 0  # inside accepted(): not yet answered
        self._preparing = 0  # requests being tokenised and checked, not yet submitted to the batcher
        self._drain_deadline: float | None = None
        self._running_lock = threading.Lock()
        self._load_busy = False

    # --- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model off the event loop. On failure the state turns unhealthy and load_error is set."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        started = time.perf_counter()
        self._load_busy = True
        try:
            info = await self._load_model()
        except BaseException as exc:
            self.load_error = exc
            self.state = EngineState.UNHEALTHY
            raise
        self.load_seconds = time.perf_counter() - started
        self.info = info
        if info.max_concurrent_batches > 1:
            self._compute.shutdown(wait=False)
            self._compute = ThreadPoolExecutor(max_workers=info.max_concurrent_batches, thread_name_prefix="embed")
        self.batch_policy = self._batch_policy(info)
        self._batcher = Batcher(self.run_batch, self._compute, self.batch_policy, on_batch=self._batch_done,
                                incoming=lambda: self._preparing)
        self._batcher.start()
        if self.state is EngineState.LOADING:  # (a drain that began during the load stays a drain)
            self.state = EngineState.HEALTHY
        log.info("model %s ready on %s (%s, dim %d) in %.1fs", info.model, info.device, info.dtype,
                 info.dimension, self.load_seconds)

    async def _load_model(self) -> BackendInfo:
        """The backend's load, on the compute thread (engine/remote.py gets the model's facts instead)."""
        return await asyncio.get_running_loop().run_in_executor(self._compute, self._load)

    def _batch_policy(self, info: BackendInfo) -> BatchPolicy:
        opts = self.options
        longest = min(opts.max_model_len, info.max_model_len)
        budget = opts.max_batch_tokens
        if budget < longest:  # one input of the longest accepted length must fit in a batch
            log.warning("max_batch_tokens %d is below the longest input accepted (%d tokens): using %d",
                        budget, longest, longest)
            budget = longest
        return BatchPolicy(
            max_batch_size=opts.max_batch_size,
            max_batch_tokens=budget,
            batch_timeout_s=opts.batch_timeout_ms / 1000.0,
            padded=info.padded,
            max_concurrent_batches=info.max_concurrent_batches,
            max_queue_requests=opts.max_queue_requests,
            max_queue_tokens=opts.max_queue_tokens,
        )

    def begin_drain(self, timeout_s: float) -> None:
        """Refuse new requests from now on (503 draining); accepted ones have until the deadline."""
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + timeout_s
        if self.state is not EngineState.UNHEALTHY:
            self.state = EngineState.DRAINING

    @property
    def loading(self) -> bool:
        """The backend's load is running on its thread (even if `start()` was cancelled meanwhile)."""
        return self._load_busy

    def _load(self) -> BackendInfo:
        try:
            return self._loaded(self.backend.load())
        finally:
            self._load_busy = False

    def _loaded(self, info: BackendInfo) -> BackendInfo:
        """What a task adds to the loaded model's info, still on the load's thread (embedding: int8 ranges)."""
        return info

    @property
    def idle(self) -> bool:
        """No accepted request is still being served."""
        return self._active_requests == 0 and self.queued_requests == 0

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting work, then wait for accepted work to finish. True when it all finished in time."""
        self.begin_drain(timeout_s)
        assert self._drain_deadline is not None
        timeout_s = max(0.0, min(timeout_s, self._drain_deadline - time.monotonic()))
        if self._batcher is None:
            return True
        try:
            await asyncio.wait_for(self._batcher.wait_idle(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        if self._batcher is not None:
            await self._batcher.close(ServiceError(ErrorKind.DRAINING, "server is shutting down"))
        if self.result_cache is not None and self.result_cache.cache.redis is not None:
            await self.result_cache.cache.redis.close()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.backend.close)
        self._compute.shutdown(wait=False, cancel_futures=True)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    # --- introspection -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The served name of the model (the backend's label), for logs and /health."""
        return self.info.model if self.info is not None else "?"

    @property
    def task(self) -> str:
        return self.info.task if self.info is not None else "?"

    @property
    def queued_requests(self) -> int:
        return self._batcher.queued_requests if self._batcher else 0

    @property
    def queued_tokens(self) -> int:
        return self._batcher.queued_tokens if self._batcher else 0

    @property
    def background_requests(self) -> int:
        """Background work (Batch API lines) queued or running: not in `queued_requests`."""
        return self._batcher.background_requests if self._batcher else 0

    @property
    def background_tokens(self) -> int:
        return self._batcher.background_tokens if self._batcher else 0

    @property
    def busy_seconds(self) -> dict[str, float]:
        """Seconds the engine spent on batches of each lane, "online" and "batch" (since it started)."""
        return dict(self._batcher.busy_seconds) if self._batcher else {"online": 0.0, "batch": 0.0}

    def check_ready(self) -> BackendInfo:
        if self.state is EngineState.HEALTHY and self.info is not None:
            return self.info
        if self.state is EngineState.LOADING:
            raise ServiceError(ErrorKind.NOT_READY, "the model is still loading; retry shortly",
                               code="model_not_ready", retry_after_s=5)
        if self.state is EngineState.DRAINING:
            raise ServiceError(ErrorKind.DRAINING, "server is shutting down; retry on another instance",
                               code="shutting_down", retry_after_s=1)
        raise ServiceError(ErrorKind.UNHEALTHY, "the embedding engine is unavailable", code="engine_unhealthy")

    # --- serving: what a task uses ---------------------------------------------------------------------
    @contextlib.contextmanager
    def accepted(self, *, admitted: bool = False) -> Iterator[BackendInfo]:
        """Accept a request now (503 unless serving); a drain waits for it until the block ends. The HTTP
        layer enters it before reading the body, so a body still arriving at SIGTERM is served, not refused.
        `admitted`: the server accepted this request before its body came (the body names the model), so a
        drain begun since does not refuse it."""
        draining = self.state is EngineState.DRAINING and self.info is not None
        info = self.info if admitted and draining else self.check_ready()
        assert info is not None
        self._active_requests += 1
        try:
            yield info
        finally:
            self._active_requests -= 1

    @contextlib.contextmanager
    def on_its_way(self) -> Iterator[None]:
        """A request being tokenised and checked: the idle batcher waits for it (at most batch_timeout_ms)
        rather than send an earlier one alone. Leave the block right before `submit`, which queues without
        yielding, so the batcher never sees it neither incoming nor queued; a refusal wakes the batcher.
        Background work (Batch API lines) is not counted: no batch waits for it."""
        counted = not in_background()
        self._preparing += counted
        try:
            yield
        finally:
            self._preparing -= counted
            if self._batcher is not None and counted:
                self._batcher.wake()

    @property
    def tokenizer_pool(self) -> ThreadPoolExecutor:
        """The model's one tokenizer thread: requests take turns on it (engine/tokenize.py)."""
        return self._tokenize_pool

    async def in_tokenizer_thread(self, call: Callable[..., T], *args: Any, param: str = "input") -> T:
        """`call(*args)` on the tokenizer thread (one for the model: requests take turns); text a tokenizer
        cannot read is a 400 naming `param`."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._tokenize_pool, call, *args)
        except UnicodeError as exc:
            raise invalid_unicode(exc, param) from None

    async def submit(self, seqs: Sequence[Sequence[int]], deadline: float | None = None
                     ) -> tuple[np.ndarray, float, float]:
        """Batch `seqs` with everyone else's: (rows, queue seconds, compute seconds), errors as ServiceError.
        In `priority.background()` they go in the batcher's background lane, with no timeout: they wait for
        idle capacity as long as online traffic lasts (their runner bounds and cancels them)."""
        assert self._batcher is not None
        if self.state is EngineState.UNHEALTHY:  # died while this request was being tokenised
            self.check_ready()
        background = in_background()
        submit = functools.partial(self._batcher.submit, background=background)
        try:
            timeout = self.options.request_timeout_s if deadline is None else max(0.001, deadline - time.monotonic())
            async with asyncio.timeout(None if background else timeout):  # (submit queues before anything runs)
                if tracing.TRACER is None:
                    return await submit(seqs)
                return await tracing.traced_wait(submit, seqs, self.name, len(seqs))
        except TimeoutError:
            raise ServiceError(ErrorKind.TIMEOUT, f"request did not finish within {self.options.request_timeout_s}s",
                               code="timeout") from None
        except ServiceError:
            raise
        except BackendDeadError:
            raise ServiceError(ErrorKind.UNHEALTHY, "the engine died while serving this request",
                               code="engine_unhealthy") from None
        except Exception as exc:  # the backend failed this request's batch; other batches go on
            name = type(exc).__name__
            log.error("request failed with its batch: %s: %s", name, exc)  # the log adds the request id
            raise ServiceError(ErrorKind.INTERNAL, f"the model failed ({name}); the error is in the server log",
                               code="backend_error") from None

    async def submit_cached(self, info: BackendInfo, seqs: Sequence[Sequence[int]], deadline: float,
                            client: str | None = None, *, keyed: Sequence[Sequence[int]] | None = None,
                            codec: RowCodec = FLOAT32_ROWS) -> tuple[np.ndarray, float, float, int | None]:
        """`submit` through the result cache where the model has one (cached.py): (rows, queue seconds, compute
        seconds, inputs the cache answered, None without a cache)."""
        cache = self.result_cache
        if cache is None or not seqs:
            return *await self.submit(seqs, deadline), None
        cache.bind(info)
        return await through_cache(cache, seqs, lambda misses: self.submit(misses, deadline), client, keyed=keyed,
                                   codec=codec)

    def run_batch(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """One batch on the backend as given (blocking: the batcher's compute threads, bulk jobs)."""
        with self._running_lock:
            self.batches_running += 1
        try:
            if self.options.batch_invariant:
                return _one_by_one(self.backend.embed, seqs)
            return self.backend.embed(seqs)
        except BackendDeadError as exc:
            self._mark_dead(exc)
            raise
        finally:
            with self._running_lock:
                self.batches_running -= 1

    def _mark_dead(self, exc: BackendDeadError) -> None:
        if self.state is not EngineState.UNHEALTHY:
            self.death = f"model '{self.name}' ({self.task}) died: {exc}"
            log.error("%s; the service is unhealthy and fails requests at once", self.death)
        self.state = EngineState.UNHEALTHY
        if self._batcher is not None:
            batcher = self._batcher
            if self._loop is not None:
                self._loop.call_soon_threadsafe(batcher.fail_all,
                                                ServiceError(ErrorKind.UNHEALTHY, "the embedding engine died",
                                                             code="engine_unhealthy"))
        if self.on_dead is not None and self._loop is not None:
            callback, self.on_dead = self.on_dead, None  # once
            self._loop.call_soon_threadsafe(callback, BackendDeadError(self.death or str(exc)))

    def _batch_done(self, size: int, tokens: int, seconds: float) -> None:
        if self.on_batch is not None:
            self.on_batch(size, tokens, seconds)



def _one_by_one(run: Callable[[Sequence[Sequence[int]]], np.ndarray], seqs: Sequence[Sequence[int]]) -> np.ndarray:
    """`run` once per input: each input's vector is computed from its own ids alone, in the same shapes every
    time, so its bytes cannot depend on its batch. Measured on torch fp32 MiniLM, both matter: padding beside
    longer inputs moves the last bits (the attention's reductions), and so does the number of rows beside it
    (the GEMM kernels a small batch gets differ), even among inputs of one length."""
    if len(seqs) == 1:
        return run(seqs)
    return np.concatenate([run([seq]) for seq in seqs])
