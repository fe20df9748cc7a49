"""Sparse (SPLADE) vectors without torch: the vector type a sparse backend returns, what a model folder's
facts (model_facts.py) say about its SPLADE pooling, and top-k pruning as sentence-transformers defines it
(`max_active_dims`).

A SPLADE vector has one dimension per vocabulary entry (30,522 for BERT) and a few dozen to a few hundred
non-zeros: the backend hands back only those (indices sorted ascending, float32 values), so a batch in the
batcher costs its non-zeros, not its rows x the vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .base import Backend
from .model.facts import ModelFacts, read_model_facts
from .model.tokenization import PROBES, HfTokenizer

__all__ = [
    "DOCUMENT",
    "QUERY",
    "QuerySide",
    "SparseBackend",
    "SparseLayout",
    "SparseSides",
    "SparseVector",
    "SpladeConfig",
    "document_facts",
    "nonzeros",
    "pack_rows",
    "sparse_layout",
    "splade_config",
    "top_k",
    "vocabulary_strings",
]


@dataclass(frozen=True)
class SparseVector:
    """The non-zero dimensions of one vector: `indices` (int32, ascending) and their `values` (float32)."""

    indices: np.ndarray
    values: np.ndarray


QUERY, DOCUMENT = "query", "document"  # sentence-transformers' routes (encode_query, encode_document)


class SparseBackend(Backend, Protocol):
    """A sparse model's backend: `embed` gives the document side's SparseVector rows (pack_rows); a model with
    an inference-free query side also encodes queries, without a forward (`query_vectors`)."""

    @property
    def has_query_encoder(self) -> bool: ...

    @property
    def default_route(self) -> str:
        """QUERY or DOCUMENT: what a request that names no input type gets."""
        ...

    def query_vectors(self, batch: Sequence[Sequence[int]]) -> list[SparseVector]:
        """The query side's vectors of token sequences (special tokens included, as `tokenize` gives them)."""
        ...

    def tokens_of(self, indices: np.ndarray) -> list[str]:
        """The vocabulary strings of these indices (SparseEncoder.decode's)."""
        ...


@dataclass(frozen=True)
class SpladeConfig:
    """sentence-transformers' SpladePooling settings (its defaults where the folder has none)."""

    pooling_strategy: str = "max"  # max (SPLADE v2 and later) or sum
    activation_function: str = "relu"  # relu: log(1 + relu(x)); log1p_relu: log(1 + log(1 + relu(x)))


def _splade_config(raw: Mapping[str, Any] | None) -> SpladeConfig:
    """SpladePooling's config.json (`raw`). ValueError for settings sentence-transformers refuses too."""
    raw = raw or {}
    config = SpladeConfig(pooling_strategy=str(raw.get("pooling_strategy", "max")),
                          activation_function=str(raw.get("activation_function", "relu")))
    if config.pooling_strategy not in ("max", "sum"):
        raise ValueError(f"SpladePooling pooling_strategy {config.pooling_strategy!r}: max or sum")
    if config.activation_function not in ("relu", "log1p_relu"):
        raise ValueError(f"SpladePooling activation_function {config.activation_function!r}: relu or log1p_relu")
    return config


def splade_config(facts: ModelFacts) -> SpladeConfig:
    """The SpladePooling module's config from modules.json; a plain masked-LM folder (no modules.json, as
    SparseEncoder loads one) gets the defaults."""
    for module in facts.modules:
        if module.type.endswith("SpladePooling"):
            return _splade_config(module.config)
    return SpladeConfig()


@dataclass(frozen=True)
class SparseLayout:
    """Where a sparse model's parts are: the masked-LM (document) encoder and its pooling, and, for an
    inference-free model (sentence-transformers' Router: a SparseStaticEmbedding on the query route), the
    query side's folder (its tokenizer and one weight per vocabulary entry, e.g. IDF)."""

    document_dir: Path
    splade: SpladeConfig
    query_dir: Path | None = None
    default_route: str = DOCUMENT  # what a request that names no input_type gets (SparseEncoder.encode)


def sparse_layout(facts: ModelFacts) -> SparseLayout:
    """The layout of the folder of `facts`: a plain folder or a saved SparseEncoder, or a Router
    (router_config.json). ValueError for a layout this server cannot serve, naming what it found."""
    root = Path(facts.model_dir or "")
    router = facts.router
    if router is None:
        return SparseLayout(root, splade_config(facts))
    types, structure = router.get("types") or {}, router.get("structure") or {}

    def kinds(route: str) -> list[tuple[str, str]]:
        return [(name, str(types.get(name, "")).rsplit(".", 1)[-1]) for name in structure.get(route) or []]

    document, query = kinds("document"), kinds("query")
    if [kind for _, kind in document] not in (["Transformer", "SpladePooling"], ["MLMTransformer", "SpladePooling"]):
        raise ValueError(f"{root}: router_config.json's document route is {[k for _, k in document]}; served: a "
                         "masked-LM Transformer followed by SpladePooling")
    if query and [kind for _, kind in query] != ["SparseStaticEmbedding"]:
        raise ValueError(f"{root}: router_config.json's query route is {[k for _, k in query]}; served: one "
                         "SparseStaticEmbedding (an inference-free query side) or none")
    parameters = router.get("parameters") or {}
    default = parameters.get("default_route") or next(iter(structure), "document")
    if set(structure) - {"query", "document"} or default not in ("query", "document"):
        raise ValueError(f"{root}: router routes {sorted(structure)} (default {default!r}); served: query and "
                         "document")
    pooling = facts.router_modules.get(document[1][0])
    return SparseLayout(root / document[0][0], _splade_config(pooling.config if pooling else None),
                        root / query[0][0] if query else None, str(default))


def pack_rows(vectors: Sequence[SparseVector]) -> np.ndarray:
    """Sparse vectors as the backend contract's rows: an (n, 1) object array, one SparseVector per row."""
    rows = np.empty((len(vectors), 1), dtype=object)
    for row, vector in enumerate(vectors):
        rows[row, 0] = vector
    return rows


def top_k(vector: SparseVector, k: int | None) -> SparseVector:
    """The `k` largest values (sentence-transformers' `max_active_dims`: top-k by absolute value; SPLADE
    values are never negative), still sorted by index. Ties at the cut are broken arbitrarily, as torch.topk
    does."""
    if k is None or len(vector.values) <= k:
        return vector
    keep = np.sort(np.argpartition(-np.abs(vector.values), k - 1)[:k])
    return SparseVector(vector.indices[keep], vector.values[keep])


def nonzeros(row: np.ndarray) -> SparseVector:
    """The non-zero dimensions of a dense vocabulary-sized row (an engine that answers dense rows)."""
    indices = np.flatnonzero(row).astype(np.int32)
    return SparseVector(indices, np.asarray(row[indices], dtype=np.float32))


def document_facts(facts: ModelFacts, layout: SparseLayout) -> ModelFacts:
    """The document encoder's facts: the folder's own, or (a Router) those of its sub-folder."""
    return facts if layout.document_dir == Path(facts.model_dir or "") else read_model_facts(layout.document_dir)


def vocabulary_strings(tokenizer: HfTokenizer, vocabulary: int) -> list[str]:
    """Each vocabulary index's token (return_tokens); "" for head rows past the tokenizer's vocabulary."""
    named = tokenizer.tokenizer.convert_ids_to_tokens(list(range(min(vocabulary, tokenizer.vocab_size))))
    return [str(token) for token in named] + [""] * max(0, vocabulary - tokenizer.vocab_size)


@dataclass(frozen=True)
class QuerySide:
    """An inference-free query side (sentence-transformers' SparseStaticEmbedding): one weight per token id,
    each token of a query present (special tokens aside, as it tokenises without them) getting its weight;
    no forward."""

    weights: np.ndarray
    tokenizer: HfTokenizer  # the document side's: the engine tokenises once, for either side

    @classmethod
    def load(cls, folder: Path, tokenizer: HfTokenizer) -> QuerySide:
        """The weights of a SparseStaticEmbedding folder, after checking that its tokenizer gives the document
        side's ids. ValueError where it does not."""
        from safetensors.numpy import load_file

        weights = load_file(str(folder / "model.safetensors"))["weight"].astype(np.float32)
        if HfTokenizer(str(folder))(list(PROBES)) != tokenizer(list(PROBES)):
            raise ValueError(f"{folder}: the query side's tokenizer differs from the document side's")
        if weights.ndim != 1 or weights.shape[0] < tokenizer.vocab_size:
            raise ValueError(f"{folder}: {weights.shape} weights for a vocabulary of {tokenizer.vocab_size}")
        return cls(weights, tokenizer)

    def vectors(self, batch: Sequence[Sequence[int]]) -> list[SparseVector]:
        head, tail = len(self.tokenizer.special_prefix), len(self.tokenizer.special_suffix)
        out = []
        for seq in batch:
            ids = np.unique(np.asarray(seq[head: len(seq) - tail], dtype=np.int32))
            values = self.weights[ids]
            keep = values != 0
            out.append(SparseVector(ids[keep], values[keep]))
        return out


class SparseSides:
    """What every sparse backend has beside its forward (the rest of SparseBackend): the layout's default
    route, the inference-free query side and each index's vocabulary string; a backend sets them at load."""

    _layout: SparseLayout | None = None
    _query: QuerySide | None = None
    _strings: Sequence[str] = ()

    @property
    def has_query_encoder(self) -> bool:
        return self._query is not None

    @property
    def default_route(self) -> str:
        return self._layout.default_route if self._layout is not None else DOCUMENT

    def query_vectors(self, batch: Sequence[Sequence[int]]) -> list[SparseVector]:
        assert self._query is not None, "an inference-free model"
        return self._query.vectors(batch)

    def tokens_of(self, indices: np.ndarray) -> list[str]:
        return [self._strings[i] for i in indices.tolist()]
