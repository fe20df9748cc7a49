"""The embedding task on the engine core: prompts, tokenisation, length limits, Matryoshka, and the bulk API."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from .. import tracing
from ..backends.base import Backend, BackendInfo
from ..backends.model.pooling import truncate_dimensions
from ..errors import ErrorKind, ServiceError
from ..logging_config import RequestLine
from .chunking import embed_windows
from .core import EngineCore
from .inputs import Prepared, input_limit, prepare_inputs, prepare_texts
from .int8_ranges import load_int8_ranges
from .options import EngineOptions
from .result_cache import ModelCache
from .types import EmbedRequest, EmbedResult

__all__ = ["MIN_DIMENSIONS", "EmbeddingEngine", "EngineOptions"]

log = logging.getLogger("embedding_service")
# The spec's two lines per request (`Processing 32 texts for embedding`, `Generated 32 embeddings in 0.523s
# (61.2 texts/s)`), rendered without the logging machinery's cost where the set-up allows (logging_config).
_processing = RequestLine(log, "Processing %d texts for embedding")
_generated = RequestLine(log, "Generated %d embeddings in %.3fs (%.1f texts/s)")


# The smallest Matryoshka `dimensions` accepted (below it the vectors lose too much to be worth serving).
MIN_DIMENSIONS = 32


class EmbeddingEngine(EngineCore):
    """An engine whose model embeds: `embed()` serves requests once healthy; `prepare` and `embed_batch`
    serve bulk jobs. With a `result_cache` (docs/cache.md), requests answer from it where they can; bulk jobs
    never use it (their vectors depend on their own batches only, so that a resumed run equals one run)."""

    def __init__(self, backend: Backend, options: EngineOptions, result_cache: ModelCache | None = None, *,
                 model_dir: str = "") -> None:
        super().__init__(backend, options)
        self.result_cache = result_cache
        self.model_dir = model_dir  # (what keys its calibrated int8 ranges: engine/int8_ranges.py)

    def _loaded(self, info: BackendInfo) -> BackendInfo:
        """The model's int8/uint8 ranges (`int8_ranges`), which its info carries to the API (and to API
        processes: engine/remote.py)."""
        ranges = load_int8_ranges(self.options.int8_ranges, info, self.model_dir, self.backend.tokenize,
                                  self.run_batch)
        return info if ranges is None else replace(info, int8_ranges=ranges)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        with self.accepted() as info:
            return await self.embed_accepted(request, info)

    async def embed_accepted(self, request: EmbedRequest, info: BackendInfo) -> EmbedResult:
        """`embed` for a request already inside `accepted()`."""
        deadline = time.monotonic() + self.options.request_timeout_s  # tokenising counts too
        count = request.count
        with self.on_its_way(), tracing.span("tokenize") as traced:
            prepared = await self._prepare_request(request, info, deadline)
            if traced is not None:
                traced.set_attributes({"embedding.model": self.name, "embedding.texts": count,
                                       "embedding.tokens": prepared.total})
        _processing(count)
        started = time.perf_counter()
        if prepared.windows:  # (a request with a chunked input bypasses the result cache: docs/cache.md)
            vectors, queued, compute = await embed_windows(self, prepared.seqs, prepared.windows, info.dimension,
                                                           deadline)
            cached = None
        else:
            vectors, queued, compute, cached = await self.submit_cached(info, prepared.seqs, deadline,
                                                                        request.client_id)
        elapsed = time.perf_counter() - started
        _generated(count, elapsed, count / max(elapsed, 1e-9))
        vectors = truncate_dimensions(vectors, request.dimensions)  # after the cache: one entry serves every size
        return EmbedResult(vectors=vectors, prompt_tokens=prepared.total, queue_time_s=queued,
                           compute_time_s=compute, truncated=prepared.truncated,
                           chunked={index: item.count for index, item in prepared.windows.items()}, cached=cached)

    async def token_ids(self, request: EmbedRequest) -> tuple[list[list[int]], int, Prepared]:
        """The ids embed() would feed the model for `request` (prompt, special tokens, limits, the long-input
        policy: cut when truncating, in one piece when chunking), the input limit, and the preparation (what
        was cut, the windows, the tokens billed), without embedding them: /tokenize."""
        with self.accepted() as info:
            prepared = await self._prepare_request(request, info, time.monotonic() + self.options.request_timeout_s)
            seqs = [prepared.windows[i].joined() if i in prepared.windows else ids  # (chunked: ids in one piece)
                    for i, ids in enumerate(prepared.seqs)]
            return seqs, input_limit(request, info, self.options)[0], prepared

    async def _prepare_request(self, request: EmbedRequest, info: BackendInfo, deadline: float) -> Prepared:
        """Prompt, tokenise, check the limits, plan any windows and admit (rate limits)."""
        self._check_dimensions(request.dimensions, info)
        return await prepare_inputs(self, request, info, deadline, chunkable=True)

    # --- bulk jobs: their own deterministic batches, no queue ------------------------------------------
    def prepare(self, texts: list[str], *, instruction: str | None = None, prompt_name: str | None = None,
                truncate: bool | None = None) -> list[list[int]]:
        """Prompt, tokenise and apply the length policy exactly as embed() does, synchronously (bulk jobs)."""
        return prepare_texts(self, texts, self.check_ready(), instruction=instruction, prompt_name=prompt_name,
                             truncate=truncate)

    def embed_batch(self, seqs: Sequence[Sequence[int]], dimensions: int | None = None) -> np.ndarray:
        """One batch on the backend as given (blocking; bulk jobs call it from their compute threads)."""
        info = self.check_ready()
        self._check_dimensions(dimensions, info)
        return truncate_dimensions(self.run_batch(seqs), dimensions)

    async def tokenize_count(self, texts: list[str]) -> list[int]:
        return [len(s) for s in await self.in_tokenizer_thread(self.backend.tokenize, texts)]

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
