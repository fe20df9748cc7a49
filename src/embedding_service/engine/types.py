"""Plain data passed between the API and the engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

__all__ = ["EMBED", "MULTIVECTOR", "RERANK", "SPARSE", "TASKS", "EmbedRequest", "EmbedResult", "EngineState",
           "cache_state"]

# The tasks a model serves (a model of the models file has one; docs/architecture.md: how to add one).
EMBED, RERANK, SPARSE, MULTIVECTOR = "embed", "rerank", "sparse", "multivector"
TASKS = (EMBED, RERANK, SPARSE, MULTIVECTOR)


class EngineState(StrEnum):
    LOADING = "loading"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


@dataclass
class EmbedRequest:
    """One API request: either texts or token-id sequences, plus per-request options."""

    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    instruction: str | None = None
    prompt_name: str | None = None
    input_type: str | None = None  # Cohere's; the API layer turns it into instruction/prompt_name
    dimensions: int | None = None
    truncate: bool | None = None
    truncate_start: bool = False  # truncation cuts the start and keeps the end (Cohere's truncate START)
    long_inputs: str | None = None  # refuse, truncate or chunk: over-long inputs (None: by truncate, the server's)
    max_tokens: int | None = None  # a per-request limit below the model's (Cohere's max_tokens)
    request_id: str | None = None
    client_id: str | None = None  # the caller's API key id (key-<digest>), for a per-key result cache
    token_ids_flat: bool = False  # `input` was one flat list of ids (error messages name input[pos])
    # Called with the request's token count before it is queued (rate limits); raises ServiceError to refuse.
    admit: Callable[[int], None] | None = None
    charge_refused: Callable[[int], None] | None = None  # tokens of a refused request, charged regardless

    @property
    def count(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or [])


@dataclass
class EmbedResult:
    vectors: np.ndarray  # float32 (n, dim), unit rows
    prompt_tokens: int
    queue_time_s: float = 0.0
    compute_time_s: float = 0.0
    truncated: list[int] = field(default_factory=list)  # inputs cut to the limit (their indices)
    chunked: dict[int, int] = field(default_factory=dict)  # inputs embedded in windows: index -> windows
    cached: int | None = None  # inputs the result cache answered; None: no cache

    @property
    def cache_state(self) -> str | None:
        return cache_state(self.cached, len(self.vectors))


def cache_state(cached: int | None, total: int) -> str | None:
    """What the result cache answered of `total` inputs: `hit` (every one), `miss` (none), `partial`; None
    without a cache (`cached` None)."""
    if cached is None:
        return None
    return "hit" if cached == total else "partial" if cached else "miss"
