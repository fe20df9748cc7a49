"""What every route handler reads: the served models and the route options (defaults live in EmbeddingConfig)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import EmbeddingConfig
from .embed.tiktoken_ids import TiktokenDecoder
from .served import ServedModels

__all__ = ["RouteOptions", "ServiceContext"]


@dataclass(frozen=True)
class RouteOptions:
    """The settings the handlers read (defaults live in EmbeddingConfig only)."""

    gpu_memory_utilization: float  # reported by /health, as the spec's example shows
    max_model_len: int  # reported by /health until the model has loaded
    max_body_bytes: int
    requested_device: str
    input_type_strict: bool = False  # 400 for an input_type the model has no prompt for

    @classmethod
    def from_config(cls, settings: EmbeddingConfig) -> RouteOptions:
        return cls(gpu_memory_utilization=settings.gpu_memory_utilization, max_model_len=settings.max_model_len,
                   max_body_bytes=settings.max_body_bytes, requested_device=settings.device,
                   input_type_strict=settings.input_type_strict)


class ServiceContext:
    """What the handlers need: the served models, the options, and the token-id decoder when configured."""

    def __init__(self, served: ServedModels, options: RouteOptions,
                 token_ids_decoder: TiktokenDecoder | None = None) -> None:
        self.served = served
        self.engine = served.primary.engine  # the first model: /health's top level and GET /
        self.model_name = served.primary.name
        self.options = options
        self.created = int(time.time())
        self.token_ids_decoder = token_ids_decoder
