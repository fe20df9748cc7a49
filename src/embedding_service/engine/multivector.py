"""The multi-vector (ColBERT) task on the engine core: texts become one vector per token, as a query or as a
document (PyLate's `encode(is_query=...)`), and (query, document) pairs are scored by MaxSim, through the same
tokenisation, length rules, limits and token-budget batcher as embeddings (engine/inputs.py).

A text's limit is its side's length in the model (query_length / document_length, less the marker); the
answer's size is bounded too (max_token_vectors_bytes), checked on the token counts before any forward.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from ..backends.base import BackendInfo
from ..backends.multivector import MultiVectorBackend, maxsim
from ..errors import ErrorKind, ServiceError
from ..logging_config import RequestLine
from .core import EngineCore
from .inputs import prepare_inputs, prepare_texts
from .options import EngineOptions
from .rerank import ScoreRequest, ScoreResult
from .types import EmbedRequest

__all__ = ["MultiVectorBackend", "MultiVectorEngine", "MultiVectorResult"]

log = logging.getLogger("embedding_service")
_generated = RequestLine(log, "Generated token vectors of %d texts in %.3fs")  # one line per request


@dataclass
class MultiVectorResult:
    vectors: list[np.ndarray]  # one (tokens, dim) float32 matrix per input, in order
    prompt_tokens: int
    queue_time_s: float = 0.0
    compute_time_s: float = 0.0


class MultiVectorEngine(EngineCore):
    """An engine whose model gives token vectors (PyLate's ColBERT) and scores pairs by MaxSim."""

    def __init__(self, backend: MultiVectorBackend, options: EngineOptions, *, max_documents: int) -> None:
        super().__init__(backend, options)
        self.multi_backend = backend
        self.max_documents = max_documents

    async def encode(self, request: EmbedRequest, *, query: bool) -> MultiVectorResult:
        """Each input's token vectors, as PyLate's ColBERT.encode(is_query=query) gives them."""
        with self.accepted() as info:
            if request.dimensions is not None:
                raise ServiceError(ErrorKind.INVALID_REQUEST, f"model {info.model} is a multi-vector model: "
                                   "'dimensions' does not apply (its vectors have the projection's size, "
                                   f"{info.dimension})", param="dimensions")
            if request.instruction is not None:
                raise ServiceError(ErrorKind.INVALID_REQUEST, "'instruction' does not apply to a multi-vector "
                                   "(ColBERT) model: its markers say query or document", param="instruction")
            started, deadline = time.perf_counter(), time.monotonic() + self.options.request_timeout_s
            marked, total = await self._marked(request, info, query, deadline)
            self._check_size(marked, info, "input")
            rows, queued, compute = await self.submit(marked, deadline)
            vectors = [self._kept(row, seq, query) for row, seq in zip(rows[:, 0], marked, strict=True)]
            _generated(len(marked), time.perf_counter() - started)
        return MultiVectorResult(vectors, total, queued, compute)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """MaxSim of each (queries[i], documents[i]): the queries as queries, the documents as documents,
        one batch submission for both (a repeated query is encoded once)."""
        with self.accepted() as info:
            if request.instruction is not None:
                raise ServiceError(ErrorKind.INVALID_REQUEST, "'instruction' does not apply to a multi-vector "
                                   "(ColBERT) model", param="instruction")
            if len(request.documents) > self.max_documents:
                raise ServiceError(ErrorKind.INVALID_REQUEST, f"too many documents: {len(request.documents)}; at "
                                   f"most {self.max_documents} per request", param=request.param)
            firsts, deadline = list(dict.fromkeys(request.queries)), time.monotonic() + self.options.request_timeout_s
            queries, query_tokens = await self._marked(
                EmbedRequest(texts=firsts, truncate=request.truncate), info, True, deadline)
            cut = True if request.max_tokens_per_doc is not None else request.truncate  # Cohere's: cut to it
            documents, document_tokens = await self._marked(
                EmbedRequest(texts=request.documents, truncate=cut,
                             max_tokens=_doc_limit(request, self.multi_backend)), info, False, deadline)
            if query_tokens + document_tokens > self.options.max_request_tokens:
                raise ServiceError(ErrorKind.INVALID_REQUEST, f"request has {query_tokens + document_tokens} "
                                   f"tokens in all; at most {self.options.max_request_tokens} per request: split it",
                                   param=request.param)
            if request.admit is not None:
                request.admit(query_tokens + document_tokens)
            started = time.perf_counter()
            rows, queued, compute = await self.submit(queries + documents, deadline)
            vectors = [self._kept(row, seq, i < len(queries))
                       for i, (row, seq) in enumerate(zip(rows[:, 0], queries + documents, strict=True))]
            index = {text: i for i, text in enumerate(firsts)}
            scores = np.asarray([maxsim(vectors[index[q]], vectors[len(queries) + n])
                                 for n, q in enumerate(request.queries)], dtype=np.float32)
            _generated(len(rows), time.perf_counter() - started)
        return ScoreResult(scores, query_tokens + document_tokens, queued, compute)

    # --- bulk jobs: their own deterministic batches, no queue (as EmbeddingEngine.prepare / embed_batch) -----
    def prepare(self, texts: list[str], *, query: bool, truncate: bool | None = None) -> list[list[int]]:
        """The marked token ids encode() would give the model for `texts`, synchronously."""
        info = self.check_ready()
        side = replace(info, max_model_len=self.multi_backend.side_limit(query))
        return [self.multi_backend.mark(seq, query) for seq in prepare_texts(self, texts, side, truncate=truncate)]

    def encode_batch(self, marked: list[list[int]], *, query: bool) -> list[np.ndarray]:
        """One batch's token vectors (blocking), as encode() keeps them; bulk jobs call it from their threads."""
        self.check_ready()
        return [self._kept(row, seq, query) for row, seq in zip(self.run_batch(marked)[:, 0], marked, strict=True)]

    async def _marked(self, request: EmbedRequest, info: BackendInfo, query: bool, deadline: float
                      ) -> tuple[list[list[int]], int]:
        """Tokenised under the side's limit (and the request's checks), then marked and expanded as PyLate
        does; the token count is the texts' own (what rate limits and usage count)."""
        side = replace(info, max_model_len=self.multi_backend.side_limit(query))
        with self.on_its_way():
            prepared = await prepare_inputs(self, request, side, deadline)  # (not chunkable: one vector per token)
        return [self.multi_backend.mark(seq, query) for seq in prepared.seqs], prepared.total

    def _check_size(self, marked: list[list[int]], info: BackendInfo, param: str) -> None:
        """Refuse, before any forward, an answer larger than max_token_vectors_bytes (an upper bound: a
        document's skip-list tokens are dropped after)."""
        size = sum(len(seq) for seq in marked) * info.dimension * 4
        if size > self.options.max_token_vectors_bytes:
            raise ServiceError(ErrorKind.PAYLOAD_TOO_LARGE, f"the token vectors of this request would be up to "
                               f"{size} bytes (float32), more than max_token_vectors_bytes "
                               f"({self.options.max_token_vectors_bytes}): send fewer or shorter texts",
                               param=param, code="response_too_large")

    def _kept(self, row: object, seq: list[int], query: bool) -> np.ndarray:
        """A query keeps every position (expansion included); a document drops its skip-list tokens."""
        assert isinstance(row, np.ndarray), "a multi-vector backend returns one matrix per row"
        if query:
            return row
        skip = self.multi_backend.skiplist
        return row[[token not in skip for token in seq]]


def _doc_limit(request: ScoreRequest, backend: MultiVectorBackend) -> int | None:
    """Cohere's max_tokens_per_doc, within the document side's limit."""
    if request.max_tokens_per_doc is None:
        return None
    return min(request.max_tokens_per_doc, backend.side_limit(False))
