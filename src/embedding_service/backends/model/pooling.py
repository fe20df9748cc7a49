"""Pooling and normalisation as pure functions (which pooling a model uses: model_facts.py).

The tensor functions take torch tensors but never import torch at module level, so the API layer can
import this module (for `l2_normalize` / `truncate_dimensions`) without pulling torch in.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .facts import PoolingMode

__all__ = [
    "cls_pool",
    "l2_normalize",
    "last_token_pool",
    "mean_pool",
    "pool",
    "pool_numpy",
    "truncate_dimensions",
]

def mean_pool(hidden: Any, mask: Any) -> Any:
    """Average of the token states the attention mask keeps."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    return summed / weights.sum(dim=1).clamp(min=1e-9)


def cls_pool(hidden: Any, mask: Any) -> Any:
    """The first token's state (BERT's [CLS])."""
    del mask
    return hidden[:, 0]


def last_token_pool(hidden: Any, mask: Any) -> Any:
    """The last real token's state, for left- or right-padded batches alike."""
    if bool(mask[:, -1].all()):  # left padding (or no padding): the last column is real everywhere
        return hidden[:, -1]
    lengths = mask.sum(dim=1) - 1
    rows = lengths.new_tensor(range(hidden.shape[0]))
    return hidden[rows, lengths]


_POOLERS = {"mean": mean_pool, "cls": cls_pool, "last": last_token_pool}


def pool(mode: PoolingMode, hidden: Any, mask: Any) -> Any:
    return _POOLERS[mode](hidden, mask)


def pool_numpy(mode: PoolingMode, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The same pooling on numpy arrays (runtimes that hand back numpy: OpenVINO), in float32."""
    hidden = np.asarray(hidden, dtype=np.float32)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        if bool(mask[:, -1].all()):
            return hidden[:, -1]
        return hidden[np.arange(hidden.shape[0]), mask.sum(axis=1) - 1]
    weights = mask[..., None].astype(np.float32)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def truncate_dimensions(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka: keep the first `dimensions` components and re-normalise."""
    if dimensions is None or dimensions >= vectors.shape[-1]:
        return vectors
    return l2_normalize(vectors[..., :dimensions])
