"""The embedding task on the engine core: prompts, tokenisation, length limits, Matryoshka, and the bulk API."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from .. import tracing
from ..backends.base import BackendInfo
from ..backends.pooling import truncate_dimensions
from ..errors import ErrorKind, ServiceError
from ..logging_config import RequestLine
from .core import EngineCore, invalid_unicode
from .options import EngineOptions
from .prompts import apply_prompt
from .token_ids import check_token_ids, with_special_tokens
from .tokenize import TokenLimitError, tokenize_bounded
from .truncation import keep_end, keep_start
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
    serve bulk jobs."""

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        with self.accepted() as info:
            return await self.embed_accepted(request, info)

    async def embed_accepted(self, request: EmbedRequest, info: BackendInfo) -> EmbedResult:
        """`embed` for a request already inside `accepted()`."""
        deadline = time.monotonic() + self.options.request_timeout_s  # tokenising counts too
        count = request.count
        with self.on_its_way(), tracing.span("tokenize") as traced:
            seqs, total = await self._prepare_request(request, info, deadline)
            if traced is not None:
                traced.set_attributes({"embedding.model": self.name, "embedding.texts": count,
                                       "embedding.tokens": total})
        _processing(count)
        started = time.perf_counter()
        vectors, queued, compute = await self.submit(seqs, deadline)
        elapsed = time.perf_counter() - started
        _generated(count, elapsed, count / max(elapsed, 1e-9))
        vectors = truncate_dimensions(vectors, request.dimensions)
        return EmbedResult(vectors=vectors, prompt_tokens=total, queue_time_s=queued, compute_time_s=compute)

    async def token_ids(self, request: EmbedRequest) -> tuple[list[list[int]], int]:
        """The ids embed() would feed the model for `request` (prompt, special tokens, limits, truncation) and
        the input limit, without embedding them: /tokenize, so a client counts what it will be billed."""
        with self.accepted() as info:
            seqs, _ = await self._prepare_request(request, info, time.monotonic() + self.options.request_timeout_s)
            return seqs, self._limit(request, info)[0]

    async def _prepare_request(self, request: EmbedRequest, info: BackendInfo, deadline: float
                               ) -> tuple[list[list[int]], int]:
        """Prompt, tokenise, check the limits and admit (rate limits): the ids and their token count."""
        self._check_dimensions(request.dimensions, info)
        count = request.count
        if count > self.options.max_inputs_per_request:
            raise ServiceError(ErrorKind.INVALID_REQUEST,
                               f"too many inputs: {count}; at most {self.options.max_inputs_per_request} "
                               "per request", param="input")
        limit, limit_name = self._limit(request, info)
        if request.texts is not None:
            texts = apply_prompt(request.texts, instruction=request.instruction, prompt_name=request.prompt_name,
                                 prompts=info.prompts, default_prompt_name=info.default_prompt_name)
            try:
                seqs = await tokenize_bounded(
                    texts, self.backend.tokenize, self.tokenizer_pool,
                    limit=limit, truncate=self.options.truncate if request.truncate is None else request.truncate,
                    max_total=self.options.max_request_tokens,
                    specials=len(info.special_prefix) + len(info.special_suffix), deadline=deadline,
                    keep_end=request.truncate_start, limit_name=limit_name)
            except TokenLimitError as exc:
                if request.charge_refused is not None:  # a refusal is not free: its tokens count (lower bound)
                    request.charge_refused(exc.tokens_at_least)
                raise
            except UnicodeError as exc:
                raise invalid_unicode(exc, "input") from None
        else:
            seqs = self._prepare_ids(request.token_ids or [], info, flat=request.token_ids_flat)
        try:
            seqs = self._enforce_lengths(seqs, info, request.truncate, limit=(limit, limit_name),
                                         cut_start=request.truncate_start)
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
            raise invalid_unicode(exc, "input") from None
        return self._enforce_lengths(seqs, info, truncate)

    def embed_batch(self, seqs: Sequence[Sequence[int]], dimensions: int | None = None) -> np.ndarray:
        """One batch on the backend as given (blocking; bulk jobs call it from their compute threads)."""
        info = self.check_ready()
        self._check_dimensions(dimensions, info)
        return truncate_dimensions(self.run_batch(seqs), dimensions)

    async def tokenize_count(self, texts: list[str]) -> list[int]:
        return [len(s) for s in await self.in_tokenizer_thread(self.backend.tokenize, texts)]

    def _prepare_ids(self, token_ids: list[list[int]], info: BackendInfo, *, flat: bool = False
                     ) -> list[list[int]]:
        # LangChain's OpenAIEmbeddings sends OpenAI (tiktoken) ids by default: the usual cause of a bad id.
        check_token_ids(token_ids, info.vocab_size, flat=flat, vocabulary="this model's vocabulary",
                        hint="; token ids must come from this model's tokenizer (LangChain: set "
                             "check_embedding_ctx_length=False to send text)")
        return [with_special_tokens(ids, info.special_prefix, info.special_suffix) for ids in token_ids]

    def _limit(self, request: EmbedRequest, info: BackendInfo) -> tuple[int, str]:
        """The tokens one input may have, and what refusals call that limit: the model's, or max_tokens."""
        limit = min(self.options.max_model_len, info.max_model_len)
        if request.max_tokens is None:
            return limit, "this model's limit"
        if not 1 <= request.max_tokens <= limit:
            raise ServiceError(ErrorKind.INVALID_REQUEST, f"max_tokens must be between 1 and this model's limit "
                               f"of {limit}, got {request.max_tokens}", param="max_tokens")
        return request.max_tokens, "max_tokens"

    def _enforce_lengths(self, seqs: list[list[int]], info: BackendInfo, truncate: bool | None, *,
                         limit: tuple[int, str] | None = None, cut_start: bool = False) -> list[list[int]]:
        most, limit_name = limit or (min(self.options.max_model_len, info.max_model_len), "this model's limit")
        cut = self.options.truncate if truncate is None else truncate
        for index, ids in enumerate(seqs):
            if not ids:
                raise ServiceError(ErrorKind.INVALID_REQUEST, f"input[{index}] is empty", param="input")
            if len(ids) > most:
                if not cut:
                    raise ServiceError(ErrorKind.INVALID_REQUEST,
                                       f"input[{index}] has {len(ids)} tokens, more than {limit_name} of "
                                       f"{most}; shorten it or send \"truncate\": true", param="input",
                                       code="context_length_exceeded")
                seqs[index] = keep_end(ids, most, info) if cut_start else keep_start(ids, most, info)
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
