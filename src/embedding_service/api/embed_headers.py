"""The response headers of an embedding answer (OpenAI's and Cohere's routes): timing, and what the result
cache answered (docs/cache.md)."""

from __future__ import annotations

from typing import Any

from ..engine.types import EmbedResult
from .openapi import header

__all__ = ["CACHE_HEADER", "EMBED_HEADERS", "embed_headers"]

CACHE_HEADER = "X-Embedding-Cache"
_MS = r"^[0-9]+\.[0-9]{2}$"
EMBED_HEADERS: dict[str, Any] = {
    "X-Queue-Time-Ms": header("milliseconds queued for a batch", pattern=_MS),
    "X-Inference-Time-Ms": header("milliseconds of model compute", pattern=_MS),
    CACHE_HEADER: header("the result cache answered every input (hit), none (miss) or some (partial); absent "
                         "when the cache is off", required=False, pattern=r"^(hit|miss|partial)$"),
}


def embed_headers(result: EmbedResult) -> dict[str, str]:
    headers = {"X-Queue-Time-Ms": f"{result.queue_time_s * 1000:.2f}",
               "X-Inference-Time-Ms": f"{result.compute_time_s * 1000:.2f}"}
    state = result.cache_state
    if state is not None:
        headers[CACHE_HEADER] = state
    return headers
