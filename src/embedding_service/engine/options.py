"""What an engine reads from the settings (defaults live in EmbeddingConfig only)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import EmbeddingConfig

__all__ = ["EngineOptions", "ResultCacheOptions"]


@dataclass(frozen=True)
class EngineOptions:
    """Batching, limits and timeouts of one model's engine."""

    max_batch_size: int
    max_batch_tokens: int
    batch_timeout_ms: float
    max_model_len: int
    max_inputs_per_request: int
    max_request_tokens: int
    truncate: bool  # over-long inputs are cut (long_inputs == "truncate"): rerankers read it
    long_inputs: str  # refuse, truncate or chunk: what an over-long input gets unless its request says
    max_chunked_input_tokens: int
    max_queue_requests: int
    max_queue_tokens: int
    request_timeout_s: float
    max_token_vectors_bytes: int  # a multi-vector model's answer, as float32 bytes
    batch_invariant: bool = False
    int8_ranges: str = "unit"  # unit, calibrate or a file's path (engine/int8_ranges.py)

    @classmethod
    def from_config(cls, settings: EmbeddingConfig) -> EngineOptions:
        policy = "truncate" if settings.truncate else settings.long_inputs  # (truncate: its older name)
        given = {name: getattr(settings, name) for name in _ENGINE_FIELDS}
        return cls(**given, truncate=policy == "truncate", long_inputs=policy)


_ENGINE_FIELDS = tuple(name for name in EngineOptions.__dataclass_fields__ if name not in ("truncate", "long_inputs"))


@dataclass(frozen=True)
class ResultCacheOptions:
    """The exact result cache of a server process (docs/cache.md): memory bound, optional Redis store."""

    max_bytes: int  # 0: no memory cache
    redis_url: str | None
    redis_ttl_s: float
    per_key: bool  # each API key its own entries

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 or self.redis_url is not None

    @classmethod
    def from_config(cls, settings: EmbeddingConfig) -> ResultCacheOptions:
        return cls(max_bytes=settings.result_cache_bytes, redis_url=settings.result_cache_redis,
                   redis_ttl_s=settings.result_cache_redis_ttl_s, per_key=settings.result_cache_per_key)
