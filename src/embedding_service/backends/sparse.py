"""Sparse (SPLADE) vectors without torch: the vector type a sparse backend returns, what a model folder says
about its SPLADE pooling, and top-k pruning as sentence-transformers defines it (`max_active_dims`).

A SPLADE vector has one dimension per vocabulary entry (30,522 for BERT) and a few dozen to a few hundred
non-zeros: the backend hands back only those (indices sorted ascending, float32 values), so a batch in the
batcher costs its non-zeros, not its rows x the vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SparseVector", "SpladeConfig", "pack_rows", "read_splade_config", "top_k"]


@dataclass(frozen=True)
class SparseVector:
    """The non-zero dimensions of one vector: `indices` (int32, ascending) and their `values` (float32)."""

    indices: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class SpladeConfig:
    """sentence-transformers' SpladePooling settings (its defaults where the folder has none)."""

    pooling_strategy: str = "max"  # max (SPLADE v2 and later) or sum
    activation_function: str = "relu"  # relu: log(1 + relu(x)); log1p_relu: log(1 + log(1 + relu(x)))


def read_splade_config(model_dir: str | Path) -> SpladeConfig:
    """The SpladePooling module's config from modules.json; a plain masked-LM folder (no modules.json, as
    SparseEncoder loads one) gets the defaults. ValueError for settings sentence-transformers refuses too."""
    root = Path(model_dir)
    try:
        modules = json.loads((root / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return SpladeConfig()
    for module in modules if isinstance(modules, list) else []:
        if isinstance(module, dict) and str(module.get("type", "")).endswith("SpladePooling"):
            try:
                raw = json.loads((root / str(module.get("path", "")) / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raw = {}
            config = SpladeConfig(pooling_strategy=str(raw.get("pooling_strategy", "max")),
                                  activation_function=str(raw.get("activation_function", "relu")))
            if config.pooling_strategy not in ("max", "sum"):
                raise ValueError(f"SpladePooling pooling_strategy {config.pooling_strategy!r}: max or sum")
            if config.activation_function not in ("relu", "log1p_relu"):
                raise ValueError(f"SpladePooling activation_function {config.activation_function!r}: relu or "
                                 "log1p_relu")
            return config
    return SpladeConfig()


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
