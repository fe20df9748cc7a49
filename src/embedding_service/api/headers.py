"""The response headers of an embedding answer (OpenAI's and Cohere's routes), a sparse one and a score: timing,
what the result cache answered (docs/cache.md), and which inputs were truncated or chunked (docs/clients.md,
"Long inputs")."""

from __future__ import annotations

from typing import Any

from ..engine.types import EmbedResult
from .openapi import header

__all__ = ["CACHE_HEADER", "EMBED_HEADERS", "embed_headers", "long_input_headers", "result_headers"]

CACHE_HEADER = "X-Embedding-Cache"
_MS = r"^[0-9]+\.[0-9]{2}$"
EMBED_HEADERS: dict[str, Any] = {
    "X-Queue-Time-Ms": header("milliseconds queued for a batch", pattern=_MS),
    "X-Inference-Time-Ms": header("milliseconds of model compute", pattern=_MS),
    CACHE_HEADER: header("the result cache answered every input (hit), none (miss) or some (partial); absent "
                         "when the cache is off", required=False, pattern=r"^(hit|miss|partial)$"),
    "X-Truncated-Inputs": header("indices of the inputs cut to the limit (e.g. 0,3-5); absent when none",
                                 required=False, pattern=r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$"),
    "X-Chunked-Inputs": header("index:windows of each input embedded in windows and averaged (e.g. 2:4); "
                               "absent when none", required=False, pattern=r"^[0-9]+:[0-9]+(,[0-9]+:[0-9]+)*$"),
}


def embed_headers(result: EmbedResult) -> dict[str, str]:
    headers = result_headers(result.queue_time_s, result.compute_time_s, result.cache_state)
    return {**headers, **long_input_headers(result.truncated, result.chunked)}


def result_headers(queue_time_s: float, compute_time_s: float, cache_state: str | None) -> dict[str, str]:
    """Any task's answer (embeddings, sparse vectors, scores): timing, and the cache's state where it has one."""
    headers = {"X-Queue-Time-Ms": f"{queue_time_s * 1000:.2f}", "X-Inference-Time-Ms": f"{compute_time_s * 1000:.2f}"}
    if cache_state is not None:
        headers[CACHE_HEADER] = cache_state
    return headers


def _ranges(indices: list[int]) -> str:
    """0,3-5,9: sorted indices, runs written as ranges (a request that cuts 2048 inputs stays one short header)."""
    parts: list[str] = []
    for index in sorted(indices):
        if parts and parts[-1].split("-")[-1] == str(index - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{index}"
        else:
            parts.append(str(index))
    return ",".join(parts)


def long_input_headers(truncated: list[int], chunked: dict[int, int]) -> dict[str, str]:
    """What was done to over-long inputs, for any API's response: X-Truncated-Inputs (the indices cut to the
    limit, as ranges) and X-Chunked-Inputs (index:windows of each input embedded in windows). Absent when
    nothing was done."""
    headers = {}
    if truncated:
        headers["X-Truncated-Inputs"] = _ranges(truncated)
    if chunked:
        headers["X-Chunked-Inputs"] = ",".join(f"{index}:{count}" for index, count in sorted(chunked.items()))
    return headers
