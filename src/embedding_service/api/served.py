"""Which models this server serves (an embedding model and/or a reranker), and which one a request gets.

`model` selects by name. A name that is not served (or none) gets the endpoint's natural model, as the
embeddings endpoint ignores unknown names: clients such as the Cohere SDK always send one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.engine import EmbeddingEngine
from ..engine.rerank import RerankEngine
from ..errors import ErrorKind, ServiceError

__all__ = ["Served", "ServedModels"]

EMBED, RERANK = "embed", "rerank"


@dataclass(frozen=True)
class Served:
    name: str  # the public name (`model` in requests and responses)
    engine: EmbeddingEngine
    task: str  # "embed" or "rerank"


class ServedModels:
    def __init__(self, embed: Served | None, rerank: Served | None) -> None:
        if embed is None and rerank is None:
            raise ValueError("a server serves at least one model")
        self.embed, self.rerank = embed, rerank

    @property
    def all(self) -> list[Served]:
        return [m for m in (self.embed, self.rerank) if m is not None]

    def named(self, model: str | None) -> Served | None:
        return next((m for m in self.all if model is not None and m.name == model), None)

    def for_rerank(self, model: str | None) -> tuple[Served, RerankEngine]:
        chosen = self.named(model) or self.rerank or self.embed
        assert chosen is not None
        if not isinstance(chosen.engine, RerankEngine):
            raise ServiceError(ErrorKind.INVALID_REQUEST,
                               f"model '{chosen.name}' is an embedding model (task: embed); it cannot rerank. "
                               "Serve a reranker beside it (--rerank-model-path or --rerank-model)",
                               param="model", code="model_cannot_rerank")
        return chosen, chosen.engine

    def for_score(self, model: str | None) -> Served:
        """A reranker scores pairs itself; an embedding model scores them by cosine (as vLLM does)."""
        chosen = self.named(model) or self.rerank or self.embed
        assert chosen is not None
        return chosen

    def for_embed(self, model: str | None) -> Served:
        chosen = self.named(model) or self.embed or self.rerank
        assert chosen is not None
        if chosen.task != EMBED:
            raise ServiceError(ErrorKind.INVALID_REQUEST,
                               f"model '{chosen.name}' is a reranker (task: rerank); it cannot embed. Use "
                               "/v1/rerank or /v1/score with it", param="model", code="model_cannot_embed")
        return chosen
