"""The engine layer: batching and request handling over a backend."""

from .batcher import Batcher, BatchPolicy
from .engine import EmbeddingEngine, EngineOptions
from .types import EmbedRequest, EmbedResult, EngineState

__all__ = ["BatchPolicy", "Batcher", "EmbedRequest", "EmbedResult", "EmbeddingEngine", "EngineOptions", "EngineState"]
