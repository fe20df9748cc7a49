"""The rerank task on the engine core: (query, document) pairs through the same lifecycle, limits and
token-budget batcher as embeddings, over a scoring backend (one score per pair)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import tracing
from ..backends.base import BackendInfo
from ..backends.model.pair_tokenizer import PairBackend, TokenPair
from ..errors import ErrorKind, ServiceError
from ..logging_config import RequestLine
from .core import EngineCore
from .options import EngineOptions
from .result_cache import ModelCache
from .types import cache_state

__all__ = ["PairBackend", "RerankEngine", "ScoreRequest", "ScoreResult"]

log = logging.getLogger("embedding_service")
_scored = RequestLine(log, "Scored %d pairs in %.3fs")  # one line per request (logging_config)


@dataclass
class ScoreRequest:
    """Pairs (queries[i], documents[i]); a rerank request repeats its one query."""

    queries: list[str]
    documents: list[str]
    instruction: str | None = None
    truncate: bool | None = None
    max_tokens_per_doc: int | None = None  # Cohere v2: each document cut to this many tokens first
    param: str = "documents"  # the request field errors about a document name
    admit: Callable[[int], None] | None = None  # token rate limit, called with the pairs' tokens
    client_id: str | None = None  # the caller's `key-<digest>` id (a per-key result cache)


@dataclass
class ScoreResult:
    scores: np.ndarray  # float32 (n,)
    prompt_tokens: int
    queue_time_s: float = 0.0
    compute_time_s: float = 0.0
    cache_state: str | None = None  # what the result cache answered (types.cache_state); None: no cache


def _pair_key(pair: TokenPair) -> list[int]:
    """What a pair's cache key hashes: its ids, then (after a -1 no id can be) where token type 1 starts:
    the model sees both (-1 again for one segment)."""
    second = pair.second_start
    return [*pair, -1, -1 if second is None else second]


class RerankEngine(EngineCore):
    """An engine whose model scores (query, document) pairs."""

    def __init__(self, backend: PairBackend, options: EngineOptions, *, max_documents: int,
                 result_cache: ModelCache | None = None) -> None:
        super().__init__(backend, options)
        self.pair_backend = backend
        self.max_documents = max_documents
        self.result_cache = result_cache

    async def score(self, request: ScoreRequest) -> ScoreResult:
        with self.accepted() as info:
            with self.on_its_way(), tracing.span("tokenize") as traced:
                pairs = await self._prepare_pairs(request, info)
                if traced is not None:
                    traced.set_attributes({"embedding.model": self.name, "embedding.pairs": len(pairs),
                                           "embedding.tokens": sum(len(p) for p in pairs)})
            started = time.perf_counter()
            rows, queued, compute, cached = await self.submit_cached(
                info, pairs, time.monotonic() + self.options.request_timeout_s, request.client_id,
                keyed=[_pair_key(pair) for pair in pairs] if self.result_cache is not None else None)
            _scored(len(request.documents), time.perf_counter() - started)
            return ScoreResult(np.asarray(rows, dtype=np.float32).reshape(-1), sum(len(p) for p in pairs), queued,
                               compute, cache_state(cached, len(pairs)))

    async def _prepare_pairs(self, request: ScoreRequest, info: BackendInfo) -> list[TokenPair]:
        """Tokenise the pairs, apply the length policy, check the limits and admit (rate limits)."""
        count = len(request.documents)
        if count > self.max_documents:
            raise ServiceError(ErrorKind.INVALID_REQUEST, f"too many documents: {count}; at most "
                               f"{self.max_documents} per request", param=request.param)
        pairs = await self.in_tokenizer_thread(self.pair_backend.encode_pairs, request.queries, request.documents,
                                               request.instruction, param=request.param)
        pairs = self._fit(pairs, info, request)
        total = sum(len(p) for p in pairs)
        if total > self.options.max_request_tokens:
            raise ServiceError(ErrorKind.INVALID_REQUEST, f"request has {total} tokens in all pairs; at most "
                               f"{self.options.max_request_tokens} per request: split it", param=request.param)
        if request.admit is not None:
            request.admit(total)
        return pairs

    def _fit(self, pairs: list[TokenPair], info: BackendInfo, request: ScoreRequest) -> list[TokenPair]:
        """The length policy: refuse over-long pairs, or (truncate) cut the document and keep the query."""
        limit = min(self.options.max_model_len, info.max_model_len)
        cut = self.options.truncate if request.truncate is None else request.truncate
        out = []
        for index, pair in enumerate(pairs):
            if request.max_tokens_per_doc is not None:  # never None: the query's part is kept whole
                pair = pair.truncated(pair.head + pair.tail + request.max_tokens_per_doc) or pair
            if len(pair) > limit:
                where = f"{request.param}[{index}]"
                if not cut:
                    raise ServiceError(ErrorKind.INVALID_REQUEST,
                                       f"query + {where} is {len(pair)} tokens, more than this model's limit of "
                                       f"{limit}; shorten it or send \"truncate\": true (cuts the document)",
                                       param=request.param, code="context_length_exceeded")
                shorter = pair.truncated(limit)
                if shorter is None:
                    raise ServiceError(ErrorKind.INVALID_REQUEST,
                                       f"the query (with instruction and template) is {pair.head + pair.tail} "
                                       f"tokens, no room for {where} within this model's limit of {limit}",
                                       param="query", code="context_length_exceeded")
                pair = shorter
            out.append(pair)
        return out
