"""The embedding engine: prompts, tokenisation, limits, batching and Matryoshka, over one backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..backends.base import Backend, BackendDeadError, BackendInfo
from ..backends.pooling import truncate_dimensions
from ..config import EmbeddingConfig
from ..errors import ErrorKind, ServiceError
from ..logging_config import RequestLine
from .batcher import Batcher, BatchPolicy
from .prompts import apply_prompt
from .token_ids import check_token_ids, with_special_tokens
from .tokenize import TokenLimitError, tokenize_bounded
from .types import EmbedRequest, EmbedResult, EngineState

__all__ = ["MIN_DIMENSIONS", "EmbeddingEngine", "EngineOptions"]

log = logging.getLogger("embedding_service")
# The spec's two lines per request (`Processing 32 texts for embedding`, `Generated 32 embeddings in 0.523s
# (61.2 texts/s)`), rendered without the logging machinery's cost where the set-up allows (logging_config).
_processing = RequestLine(log, "Processing %d texts for embedding")
_generated = RequestLine(log, "Generated %d embeddings in %.3fs (%.1f texts/s)")


# The smallest Matryoshka `dimensions` accepted (below it the vectors lose too much to be worth serving).
MIN_DIMENSIONS = 32


@dataclass(frozen=True)
class EngineOptions:
    """What the engine reads from the settings (defaults live in EmbeddingConfig only)."""

    max_batch_size: int
    max_batch_tokens: int
    batch_timeout_ms: float
    max_model_len: int
    max_inputs_per_request: int
    max_request_tokens: int
    truncate: bool
    max_queue_requests: int
    max_queue_tokens: int
    request_timeout_s: float

    @classmethod
    def from_config(cls, settings: EmbeddingConfig) -> EngineOptions:
        return cls(**{name: getattr(settings, name) for name in _ENGINE_FIELDS})


_ENGINE_FIELDS = tuple(EngineOptions.__dataclass_fields__)


class EmbeddingEngine:
    """Owns a backend. `start()` loads it in the background; `embed()` serves requests once healthy."""

    def __init__(self, backend: Backend, options: EngineOptions) -> None:
        self.backend = backend
        self.options = options
        self.state = EngineState.LOADING
        self.info: BackendInfo | None = None
        self.load_error: BaseException | None = None
        self.load_seconds: float | None = None
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._batcher: Batcher | None = None
        self.batch_policy: BatchPolicy | None = None  # set by start(), from the options and the loaded model
        self.on_batch: Callable[[int, int, float], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called (on the event loop) once when the backend dies: the server exits for its supervisor.
        self.on_dead: Callable[[BaseException], None] | None = None
        self._active_requests = 0  # inside embed(): accepted, not yet answered
        self._preparing = 0  # requests being tokenised and checked, not yet submitted to the batcher
        self._drain_deadline: float | None = None
        self.batches_running = 0  # inside backend.embed, on the compute threads
        self._running_lock = threading.Lock()
        self._load_busy = False
        self.death: str | None = None  # which model died and why, once its backend died

    # --- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model off the event loop. On failure the state turns unhealthy and load_error is set."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        started = time.perf_counter()
        self._load_busy = True
        try:
            info = await loop.run_in_executor(self._compute, self._load)
        except BaseException as exc:
            self.load_error = exc
            self.state = EngineState.UNHEALTHY
            raise
        self.load_seconds = time.perf_counter() - started
        self.info = info
        self._replace_compute_pool(info.max_concurrent_batches)
        self.batch_policy = self._batch_policy(info)
        self._batcher = Batcher(self._embed_batch, self._compute, self.batch_policy, on_batch=self._batch_done,
                                incoming=lambda: self._preparing)
        self._batcher.start()
        if self.state is EngineState.LOADING:  # (a drain that began during the load stays a drain)
            self.state = EngineState.HEALTHY
        log.info("model %s ready on %s (%s, dim %d) in %.1fs", info.model, info.device, info.dtype,
                 info.dimension, self.load_seconds)

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

    def _replace_compute_pool(self, workers: int) -> None:
        if workers > 1:
            self._compute.shutdown(wait=False)
            self._compute = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embed")

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
            return self.backend.load()
        finally:
            self._load_busy = False

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

    # --- serving -------------------------------------------------------------------------------------
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
        rather than send an earlier one alone. Leave the block right before `_submit`, which queues without
        yielding, so the batcher never sees it neither incoming nor queued; a refusal wakes the batcher."""
        self._preparing += 1
        try:
            yield
        finally:
            self._preparing -= 1
            if self._batcher is not None:
                self._batcher.wake()

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        with self.accepted() as info:
            return await self.embed_accepted(request, info)

    async def embed_accepted(self, request: EmbedRequest, info: BackendInfo) -> EmbedResult:
        """`embed` for a request already inside `accepted()`."""
        deadline = time.monotonic() + self.options.request_timeout_s  # tokenising counts too
        with self.on_its_way():
            seqs, total = await self._prepare_request(request, info, deadline)
        count = request.count
        _processing(count)
        started = time.perf_counter()
        vectors, queued, compute = await self._submit(seqs, deadline)
        elapsed = time.perf_counter() - started
        _generated(count, elapsed, count / max(elapsed, 1e-9))
        vectors = truncate_dimensions(vectors, request.dimensions)
        return EmbedResult(vectors=vectors, prompt_tokens=total, queue_time_s=queued, compute_time_s=compute)

    async def _prepare_request(self, request: EmbedRequest, info: BackendInfo, deadline: float
                               ) -> tuple[list[list[int]], int]:
        """Prompt, tokenise, check the limits and admit (rate limits): the ids and their token count."""
        self._check_dimensions(request.dimensions, info)
        count = request.count
        if count > self.options.max_inputs_per_request:
            raise ServiceError(ErrorKind.INVALID_REQUEST,
                               f"too many inputs: {count}; at most {self.options.max_inputs_per_request} "
                               "per request", param="input")
        if request.texts is not None:
            texts = apply_prompt(request.texts, instruction=request.instruction, prompt_name=request.prompt_name,
                                 prompts=info.prompts, default_prompt_name=info.default_prompt_name)
            try:
                seqs = await tokenize_bounded(
                    texts, self.backend.tokenize, self._tokenize_pool,
                    limit=min(self.options.max_model_len, info.max_model_len),
                    truncate=self.options.truncate if request.truncate is None else request.truncate,
                    max_total=self.options.max_request_tokens,
                    specials=len(info.special_prefix) + len(info.special_suffix), deadline=deadline)
            except TokenLimitError as exc:
                if request.charge_refused is not None:  # a refusal is not free: its tokens count (lower bound)
                    request.charge_refused(exc.tokens_at_least)
                raise
            except UnicodeError as exc:
                raise ServiceError(ErrorKind.INVALID_REQUEST, f"input is not valid Unicode text: {exc}",
                                   param="input") from None
        else:
            seqs = self._prepare_ids(request.token_ids or [], info, flat=request.token_ids_flat)
        try:
            seqs = self._enforce_lengths(seqs, info, request.truncate)
        except ServiceError:
            if request.charge_refused is not None:
                request.charge_refused(sum(len(ids) for ids in seqs))
            raise
        total = sum(len(s) for s in seqs)
        if total > self.options.max_request_tokens and request.charge_refused is not None:
            request.charge_refused(total)
        if total > self.options.max_request_tokens:
            raise ServiceError(ErrorKind.INVALID_REQUEST,
                               f"request has {total} tokens in all; at most {self.options.max_request_tokens} "
                               "per request: split it", param="input")
        if request.admit is not None:
            request.admit(total)
        return seqs, total

    async def _submit(self, seqs: Sequence[Sequence[int]], deadline: float | None = None
                      ) -> tuple[np.ndarray, float, float]:
        """Batch `seqs` with everyone else's: (rows, queue seconds, compute seconds), errors as ServiceError."""
        assert self._batcher is not None
        if self.state is EngineState.UNHEALTHY:  # died while this request was being tokenised
            self.check_ready()
        try:
            timeout = self.options.request_timeout_s if deadline is None else max(0.001, deadline - time.monotonic())
            async with asyncio.timeout(timeout):  # (in this task: submit queues before anything else runs)
                return await self._batcher.submit(seqs)
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

    # --- bulk jobs: their own deterministic batches, no queue ------------------------------------------
    def prepare(self, texts: list[str], *, instruction: str | None = None, prompt_name: str | None = None,
                truncate: bool | None = None) -> list[list[int]]:
        """Prompt, tokenise and apply the length policy exactly as embed() does, synchronously.

        For bulk jobs (embedding_service.bulk), which form their batches themselves so that a chunk's vectors
        never depend on timing (a resumed run must equal an uninterrupted one, bit for bit).
        """
        info = self.check_ready()
        prompted = apply_prompt(texts, instruction=instruction, prompt_name=prompt_name, prompts=info.prompts,
                                default_prompt_name=info.default_prompt_name)
        try:
            seqs = self.backend.tokenize(prompted)
        except UnicodeError as exc:
            raise ServiceError(ErrorKind.INVALID_REQUEST, f"input is not valid Unicode text: {exc}",
                               param="input") from None
        return self._enforce_lengths(seqs, info, truncate)

    def embed_batch(self, seqs: Sequence[Sequence[int]], dimensions: int | None = None) -> np.ndarray:
        """One batch on the backend as given (blocking; bulk jobs call it from their compute threads)."""
        info = self.check_ready()
        self._check_dimensions(dimensions, info)
        return truncate_dimensions(self._embed_batch(seqs), dimensions)

    async def tokenize_count(self, texts: list[str]) -> list[int]:
        return [len(s) for s in await self._tokenize(texts)]

    def _embed_batch(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        with self._running_lock:
            self.batches_running += 1
        try:
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

    async def _tokenize(self, texts: list[str]) -> list[list[int]]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._tokenize_pool, self.backend.tokenize, texts)
        except UnicodeError as exc:
            raise ServiceError(ErrorKind.INVALID_REQUEST, f"input is not valid Unicode text: {exc}",
                               param="input") from None

    def _prepare_ids(self, token_ids: list[list[int]], info: BackendInfo, *, flat: bool = False
                     ) -> list[list[int]]:
        # LangChain's OpenAIEmbeddings sends OpenAI (tiktoken) ids by default: the usual cause of a bad id.
        check_token_ids(token_ids, info.vocab_size, flat=flat, vocabulary="this model's vocabulary",
                        hint="; token ids must come from this model's tokenizer (LangChain: set "
                             "check_embedding_ctx_length=False to send text)")
        return [with_special_tokens(ids, info.special_prefix, info.special_suffix) for ids in token_ids]

    def _enforce_lengths(self, seqs: list[list[int]], info: BackendInfo, truncate: bool | None) -> list[list[int]]:
        limit = min(self.options.max_model_len, info.max_model_len)
        cut = self.options.truncate if truncate is None else truncate
        for index, ids in enumerate(seqs):
            if not ids:
                raise ServiceError(ErrorKind.INVALID_REQUEST, f"input[{index}] is empty", param="input")
            if len(ids) > limit:
                if not cut:
                    raise ServiceError(ErrorKind.INVALID_REQUEST,
                                       f"input[{index}] has {len(ids)} tokens, more than this model's limit of "
                                       f"{limit}; shorten it or send \"truncate\": true", param="input",
                                       code="context_length_exceeded")
                # Keep the start, and the closing special tokens (Qwen3 pools on its end-of-text token).
                suffix = list(info.special_suffix)
                if suffix and ids[-len(suffix):] == suffix:
                    seqs[index] = [*ids[: limit - len(suffix)], *suffix]
                else:
                    seqs[index] = ids[:limit]
        return seqs

    def _check_dimensions(self, dimensions: int | None, info: BackendInfo) -> None:
        if dimensions is None or dimensions == info.dimension:
            return
        low = min(MIN_DIMENSIONS, info.dimension)
        if not info.matryoshka:
            raise ServiceError(ErrorKind.INVALID_REQUEST,
                               f"model {info.model} does not support 'dimensions' (it is not a Matryoshka "
                               f"model); omit it or pass {info.dimension}", param="dimensions")
        if not low <= dimensions <= info.dimension:
            raise ServiceError(ErrorKind.INVALID_REQUEST,
                               f"dimensions must be between {low} and {info.dimension}, got {dimensions}",
                               param="dimensions")

