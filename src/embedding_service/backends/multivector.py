"""Multi-vector (ColBERT) models without torch: what a PyLate model folder says (its markers, lengths, query
expansion, skip-list and projection layers; its files read by model_facts.py), as PyLate reads it, and MaxSim.

A ColBERT model gives one vector per token (the encoder's states through the projection, each normalised);
a query and a document are compared by MaxSim: for each query token, its best dot product with any document
token, summed. PyLate's rules, which this server follows exactly (pylate.models.ColBERT.tokenize / encode):
- the marker ([Q] for a query, [D] for a document) goes right after the first token ([CLS]);
- a text is cut to query_length - 1 / document_length - 1 tokens before the marker goes in;
- a query is padded to query_length with the mask token ("query augmentation"); those tokens are not attended
  to (unless attend_to_expansion_tokens) but their vectors are kept;
- a document loses the vectors of the skip-list's tokens (punctuation by default); a query keeps all.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .base import Backend
from .model.facts import ModelFacts

__all__ = ["ColbertConfig", "DenseLayer", "MultiVectorBackend", "colbert_config", "maxsim"]


@dataclass(frozen=True)
class DenseLayer:
    """One pylate.models.Dense (or sentence-transformers Dense) projection of the token states."""

    path: Path  # its folder (config.json, model.safetensors)
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class ColbertConfig:
    """PyLate's settings for a model folder, with PyLate's defaults where the folder names none."""

    query_prefix: str = "[Q] "
    document_prefix: str = "[D] "
    query_length: int = 32
    document_length: int = 180
    do_query_expansion: bool = True
    attend_to_expansion_tokens: bool = False
    skiplist_words: tuple[str, ...] = tuple(string.punctuation)
    layers: tuple[DenseLayer, ...] = ()

    @property
    def dimension(self) -> int:
        return self.layers[-1].out_features if self.layers else 0


class MultiVectorBackend(Backend, Protocol):
    """A ColBERT model's backend: `embed` gives every position's normalised vector of marked sequences, one
    (tokens, dim) float32 matrix per row of an (n, 1) object array."""

    config: ColbertConfig
    skiplist: frozenset[int]  # token ids whose vectors a document drops

    def side_limit(self, query: bool) -> int:
        """The most tokens a query's / a document's text may have, before its marker goes in."""
        ...

    def mark(self, seq: Sequence[int], query: bool) -> list[int]:
        """The sequence the model runs: marker inserted, a query expanded."""
        ...


def _dense_layers(facts: ModelFacts, root: Path) -> tuple[DenseLayer, ...]:
    if not facts.modules:
        raise ValueError(f"{root}: no modules.json: a ColBERT folder lists its Transformer and Dense modules")
    layers = []
    for module in facts.modules[1:]:
        if not module.type.endswith("Dense"):
            raise ValueError(f"{root}: module {module.type} after the Transformer; served: Dense projections")
        folder, config = module.path, module.config
        if config is None:
            raise ValueError(f"{folder}: no readable config.json")
        activation = str(config.get("activation_function", "torch.nn.modules.linear.Identity"))
        if not activation.endswith("Identity") or config.get("use_residual"):
            raise ValueError(f"{folder}: a Dense with activation {activation} / use_residual "
                             f"{config.get('use_residual')}; served: linear projections (Identity, no residual)")
        layers.append(DenseLayer(folder, int(config["in_features"]), int(config["out_features"]),
                                 bool(config.get("bias", True))))
    if not layers:
        raise ValueError(f"{root}: no projection (Dense) module: PyLate would add a random one")
    return tuple(layers)


def colbert_config(facts: ModelFacts) -> ColbertConfig:
    """PyLate's settings of the folder of `facts` (config_sentence_transformers.json, modules.json).
    ValueError for a folder this server cannot serve as PyLate would, naming what it found."""
    root = Path(facts.model_dir or "")
    raw = facts.st_config
    defaults = ColbertConfig()

    def get(key: str, default: Any) -> Any:
        value = raw.get(key)
        return default if value is None else value

    expansion = bool(get("do_query_expansion", defaults.do_query_expansion))
    config = ColbertConfig(
        query_prefix=str(get("query_prefix", defaults.query_prefix)),
        document_prefix=str(get("document_prefix", defaults.document_prefix)),
        query_length=int(get("query_length", defaults.query_length)),
        document_length=int(get("document_length", defaults.document_length)),
        do_query_expansion=expansion,
        attend_to_expansion_tokens=expansion and bool(get("attend_to_expansion_tokens", False)),
        skiplist_words=tuple(str(w) for w in get("skiplist_words", defaults.skiplist_words)),
        layers=_dense_layers(facts, root))
    for side in ("query_length", "document_length"):
        if getattr(config, side) < 3:
            raise ValueError(f"{root}: {side} {getattr(config, side)}: too short for a marker and a token")
    return config


def maxsim(query: np.ndarray, document: np.ndarray) -> float:
    """ColBERT's score (pylate.scores.colbert_scores of one pair): for each query vector, its largest dot
    product with a document vector, summed."""
    if not len(query) or not len(document):
        return 0.0
    return float((query @ document.T).max(axis=1).sum())
