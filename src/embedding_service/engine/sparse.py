"""The sparse (SPLADE) task on the engine core: texts become vocabulary-sized vectors of which only the
non-zeros travel (indices ascending, values), through the same tokenisation, length rules, limits and
token-budget batcher as embeddings (engine/inputs.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from ..backends.sparse import DOCUMENT, QUERY, SparseBackend, SparseVector, pack_rows, top_k
from ..errors import ErrorKind, ServiceError
from ..logging_config import RequestLine
from .cached import RowCodec
from .core import EngineCore
from .inputs import prepare_inputs, prepare_texts
from .options import EngineOptions
from .result_cache import ModelCache
from .types import EmbedRequest, cache_state

__all__ = ["MAX_TOP_K", "SIDES", "SparseEngine", "SparseResult", "SparseVector"]

log = logging.getLogger("embedding_service")
_generated = RequestLine(log, "Generated %d sparse vectors in %.3fs")  # one line per request (logging_config)

MAX_TOP_K = 1 << 20  # above any vocabulary: a larger top_k is a mistake, not a wish
SIDES = (QUERY, DOCUMENT)  # sentence-transformers' routes: encode_query / encode_document


@dataclass
class SparseResult:
    vectors: list[SparseVector]  # one per input, in order
    prompt_tokens: int
    queue_time_s: float = 0.0
    compute_time_s: float = 0.0
    tokens: list[list[str]] | None = None  # with return_tokens: each non-zero's vocabulary string
    cache_state: str | None = None  # what the result cache answered (types.cache_state); None: no cache


class SparseEngine(EngineCore):
    """An engine whose model gives sparse vectors (a masked-LM model with SPLADE pooling; for an
    inference-free model, queries by a weight per token, without a forward)."""

    def __init__(self, backend: SparseBackend, options: EngineOptions, result_cache: ModelCache | None = None) -> None:
        super().__init__(backend, options)
        self.sparse_backend = backend
        self.result_cache = result_cache  # (the document side's forward; an inference-free query side is a lookup)

    async def encode(self, request: EmbedRequest, *, top_k: int | None = None, side: str | None = None,
                     return_tokens: bool = False) -> SparseResult:
        """The sparse vectors of the request's inputs, as SparseEncoder.encode (no side), encode_query or
        encode_document give them; `top_k` keeps each vector's k largest values
        (sentence-transformers' `max_active_dims`)."""
        with self.accepted() as info:
            if request.dimensions is not None:
                raise ServiceError(ErrorKind.INVALID_REQUEST,
                                   f"model {info.model} is a sparse model (one dimension per vocabulary entry): "
                                   "'dimensions' does not apply; use top_k to keep the largest values",
                                   param="dimensions")
            if top_k is not None and not 1 <= top_k <= MAX_TOP_K:
                raise ServiceError(ErrorKind.INVALID_REQUEST, f"top_k must be between 1 and {MAX_TOP_K}, got "
                                   f"{top_k}", param="top_k")
            if side is not None and side not in SIDES:
                raise ServiceError(ErrorKind.INVALID_REQUEST, f"side must be 'query' or 'document', got {side!r}",
                                   param="input_type")
            if side in info.prompts and request.prompt_name is None:  # as encode_query/_document do
                request.prompt_name = side
            cached = None
            deadline = time.monotonic() + self.options.request_timeout_s  # tokenising counts too
            with self.on_its_way():
                prepared = await prepare_inputs(self, request, info, deadline)
                seqs, total = prepared.seqs, prepared.total
            started = time.perf_counter()
            if self._looked_up(side):  # a lookup: no batch, no forward
                vectors, queued, compute = self.sparse_backend.query_vectors(seqs), 0.0, 0.0
            else:
                rows, queued, compute, cached = await self.submit_cached(info, seqs, deadline, request.client_id,
                                                                         codec=SPARSE_ROWS)
                vectors = list(rows[:, 0])
            _generated(len(seqs), time.perf_counter() - started)
        pruned = [_pruned(row, top_k) for row in vectors]
        tokens = [self.sparse_backend.tokens_of(v.indices) for v in pruned] if return_tokens else None
        return SparseResult(pruned, total, queued, compute, tokens, cache_state(cached, len(pruned)))

    def _looked_up(self, side: str | None) -> bool:
        """Whether `side`'s vectors come from the inference-free query encoder (a lookup) instead of a forward."""
        return (side or self.sparse_backend.default_route) == QUERY and self.sparse_backend.has_query_encoder

    # --- bulk jobs: their own deterministic batches, no queue (as EmbeddingEngine.prepare / embed_batch) -----
    def prepare(self, texts: list[str], *, side: str | None = None, truncate: bool | None = None
                ) -> list[list[int]]:
        """The token ids encode() would give the model for `texts` on `side`, synchronously."""
        info = self.check_ready()
        return prepare_texts(self, texts, info, prompt_name=side if side in info.prompts else None,
                             truncate=truncate)

    def encode_batch(self, seqs: list[list[int]], *, side: str | None = None) -> list[SparseVector]:
        """One batch's vectors on `side` (blocking), unpruned; bulk jobs call it from their compute threads."""
        self.check_ready()
        if self._looked_up(side):
            return self.sparse_backend.query_vectors(seqs)
        return [row for row in self.run_batch(seqs)[:, 0]]


class _SparseRows(RowCodec):
    """A sparse vector as the cache keeps it: its int32 indices, then its float32 values (before top_k)."""

    def encode(self, rows: np.ndarray) -> list[bytes]:
        out = []
        for row in rows[:, 0]:
            assert isinstance(row, SparseVector), "a sparse backend returns SparseVector rows"
            out.append(row.indices.astype(np.int32, copy=False).tobytes()
                       + row.values.astype(np.float32, copy=False).tobytes())
        return out

    def decode(self, values: list[bytes]) -> np.ndarray:
        vectors = []
        for value in values:
            half = len(value) // 2
            vectors.append(SparseVector(np.frombuffer(value, np.int32, half // 4),
                                        np.frombuffer(value, np.float32, half // 4, offset=half)))
        return pack_rows(vectors)


SPARSE_ROWS = _SparseRows()


def _pruned(row: object, k: int | None) -> SparseVector:
    assert isinstance(row, SparseVector), "a sparse backend returns SparseVector rows"
    return top_k(row, k)
