"""Which models this server serves (any number of embedding models and rerankers), and which one a request gets.

The request's `model` picks by name or alias. Without one, a request gets the first model of the endpoint's
task. A name that is not served gets that same model when the task has only one (clients such as the Cohere
SDK and OpenAI's always send a name of their own); when the task has several, it is refused with 404
`model_not_found` listing the served names, as OpenAI does: guessing would answer with another model's vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..engine.core import EngineCore
from ..engine.engine import EmbeddingEngine
from ..engine.multivector import MultiVectorEngine
from ..engine.rerank import RerankEngine
from ..engine.sparse import SparseEngine
from ..engine.types import EMBED, MULTIVECTOR, RERANK, SPARSE
from ..errors import ErrorKind, ServiceError

__all__ = ["EMBED", "MULTIVECTOR", "RERANK", "SPARSE", "Served", "ServedModels"]


E = TypeVar("E", bound=EngineCore)

_KINDS = {EMBED: "an embedding model", RERANK: "a reranker", SPARSE: "a sparse model",  # for refusals
          MULTIVECTOR: "a multi-vector (ColBERT) model"}
# Where each task's model is served, for refusals that send a client elsewhere.
_ROUTES = {SPARSE: "/embed_sparse or /v1/embeddings", RERANK: "/v1/rerank or /v1/score",
           MULTIVECTOR: "/v1/embeddings, /embed_all, /v1/rerank or /v1/score"}


@dataclass(frozen=True)
class Served:
    name: str  # the public name (`model` in requests and responses)
    engine: EngineCore
    task: str  # "embed", "rerank", "sparse" or "multivector"
    aliases: tuple[str, ...] = ()
    loads_alone: bool = False  # loads while no other model does (service.ModelPlan.loads_alone)


class ServedModels:
    def __init__(self, models: Sequence[Served]) -> None:
        if not models:
            raise ValueError("a server serves at least one model")
        self.all = list(models)
        self._by_name = {name: m for m in self.all for name in (m.name, *m.aliases)}

    @property
    def primary(self) -> Served:
        """The first model: what /health's top level shows (the spec's shape is one model's)."""
        return self.all[0]

    def of_task(self, task: str) -> list[Served]:
        return [m for m in self.all if m.task == task]

    @property
    def embed(self) -> Served | None:
        return next(iter(self.of_task(EMBED)), None)

    @property
    def rerank(self) -> Served | None:
        """The default reranker: the first cross-encoder, else the first multi-vector model (MaxSim)."""
        return next(iter(self.of_task(RERANK) or self.of_task(MULTIVECTOR)), None)

    def named(self, model: str | None) -> Served | None:
        return self._by_name.get(model) if model is not None else None

    def _choose(self, task: str, model: str | None) -> Served:
        """The model named (whatever its task), else the task's default; 404 for an unknown name when the
        task has several models."""
        named = self.named(model)
        if named is not None:
            return named
        candidates = self.of_task(task)
        if task == RERANK and not candidates:  # a ColBERT model reranks (MaxSim) where no cross-encoder is
            candidates = self.of_task(MULTIVECTOR)
        if model is not None and len(candidates) > 1:
            names = "', '".join(m.name for m in self.all)
            raise ServiceError(ErrorKind.NOT_FOUND, f"model '{model}' is not served here; this server serves "
                               f"'{names}'", param="model", code="model_not_found")
        return candidates[0] if candidates else self.all[0]

    def for_rerank(self, model: str | None) -> tuple[Served, RerankEngine | MultiVectorEngine]:
        """A reranker, or a multi-vector model (it scores by MaxSim)."""
        chosen = self._choose(RERANK, model)
        if not isinstance(chosen.engine, RerankEngine | MultiVectorEngine):
            raise ServiceError(ErrorKind.INVALID_REQUEST,
                               f"model '{chosen.name}' is {_KINDS[chosen.task]} (task: {chosen.task}); it cannot "
                               "rerank. Serve a reranker beside it (--rerank-model-path or --rerank-model)",
                               param="model", code="model_cannot_rerank")
        return chosen, chosen.engine

    def for_score(self, model: str | None) -> Served:
        """A reranker scores pairs itself; an embedding model scores them by cosine (as vLLM does)."""
        chosen = self._choose(RERANK if self.rerank is not None else EMBED, model)  # (a ColBERT model: MaxSim)
        if chosen.task == SPARSE:
            raise ServiceError(ErrorKind.INVALID_REQUEST, f"model '{chosen.name}' is a sparse model (task: sparse); "
                               "it cannot score pairs: name a reranker or a dense embedding model",
                               param="model", code="model_cannot_score")
        return chosen

    def for_embed(self, model: str | None) -> tuple[Served, EmbeddingEngine]:
        chosen = self._choose(EMBED, model)
        if not isinstance(chosen.engine, EmbeddingEngine):
            use = _ROUTES.get(chosen.task, "/v1/rerank or /v1/score")
            raise ServiceError(ErrorKind.INVALID_REQUEST,
                               f"model '{chosen.name}' is {_KINDS[chosen.task]} (task: {chosen.task}); it cannot "
                               f"embed here. Use {use} with it", param="model", code="model_cannot_embed")
        return chosen, chosen.engine

    def task_for_embeddings(self, model: str | None) -> str:
        """/v1/embeddings answers sparse vectors or token vectors when the model it gets is a sparse or a
        multi-vector one: that model's task."""
        return self._choose(EMBED, model).task

    def for_sparse(self, model: str | None) -> tuple[Served, SparseEngine]:
        return self._of_kind(SPARSE, SparseEngine, model, "sparse vectors. Serve a SPLADE model (task: sparse in "
                             "the models file)", "model_not_sparse")

    def for_multivector(self, model: str | None) -> tuple[Served, MultiVectorEngine]:
        return self._of_kind(MULTIVECTOR, MultiVectorEngine, model, "token vectors. Serve a ColBERT model "
                             "(task: multivector in the models file)", "model_not_multivector")

    def _of_kind(self, task: str, kind: type[E], model: str | None, lacks: str, code: str) -> tuple[Served, E]:
        """The model named (or the task's default), refused unless its engine is of `kind`."""
        chosen = self._choose(task, model)
        if not isinstance(chosen.engine, kind):
            raise ServiceError(ErrorKind.INVALID_REQUEST, f"model '{chosen.name}' is not {_KINDS[task]} (task: "
                               f"{chosen.task}); it has no {lacks}", param="model", code=code)
        return chosen, chosen.engine
