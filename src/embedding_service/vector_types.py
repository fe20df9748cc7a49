"""Typed vectors: unit float32 rows as int8, uint8, binary, ubinary or base64, as Cohere's embed v2 returns them.

The rules are sentence-transformers' `quantize_embeddings` (tests compare byte for byte):

- int8 / uint8: each dimension is mapped through a calibration range [start, end] in 255 steps (float32),
  `uint8 = clip(floor((x - start) / step), 0, 255)`, `int8 = uint8 - 128`, `step = (end - start) / 255`
  (a step of 0 counts as 1). The ranges are fixed per model, so a vector's bytes depend on that vector alone:
  by default [-1, 1] in every dimension (`UNIT_RANGES`: the components of a unit vector lie in it, so nothing
  overflows), or the model's own (`int8_ranges`: engine/int8_ranges.py), of which a Matryoshka vector of
  `dimensions` uses the first `dimensions` columns. sentence-transformers without ranges calibrates on the
  batch it is given, so the same text would get other bytes in another request, and vectors stored from
  different requests would not be comparable.
- binary / ubinary: one bit per dimension, set where the component is > 0, packed 8 to a byte (big-endian bit
  order, numpy's packbits); ubinary is the bytes as uint8, binary the same bytes minus 128 as int8. Rows are
  packed one by one: a dimension that is not a multiple of 8 is padded with 0 bits (sentence-transformers
  packs the flattened batch, which equals this when the dimension is a multiple of 8).
- base64: the float32 vector's little-endian bytes, base64-encoded (standard alphabet).
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np

__all__ = ["EMBEDDING_TYPES", "QUANTIZED_TYPES", "UNIT_RANGES", "EmbeddingType", "encode_vectors", "quantize",
           "unit_ranges"]

EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]
EMBEDDING_TYPES: tuple[EmbeddingType, ...] = ("float", "int8", "uint8", "binary", "ubinary", "base64")
QUANTIZED_TYPES: tuple[EmbeddingType, ...] = ("int8", "uint8", "binary", "ubinary")
UNIT_RANGES = (-1.0, 1.0)  # the calibration range of every dimension (see the module's docstring)


def unit_ranges(dimension: int) -> np.ndarray:
    """The calibration ranges as sentence-transformers takes them: shape (2, dimension), starts then ends."""
    return np.array([[UNIT_RANGES[0]] * dimension, [UNIT_RANGES[1]] * dimension], dtype=np.float32)


def quantize(vectors: np.ndarray, kind: EmbeddingType, ranges: np.ndarray | None = None) -> np.ndarray:
    """`vectors` (n, dim) float32 unit rows as int8, uint8, binary (int8) or ubinary (uint8) rows; int8/uint8
    through `ranges` (2, >= dim; the first dim columns are used) or, when None, [-1, 1]."""
    if kind in ("int8", "uint8"):
        dim = vectors.shape[1]
        ranges = unit_ranges(dim) if ranges is None else ranges[:, :dim].astype(np.float32, copy=False)
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)  # (a dimension constant over the calibration set)
        levels = np.clip(np.floor((vectors - starts) / steps), 0, 255)
        return levels.astype(np.uint8) if kind == "uint8" else (levels - 128).astype(np.int8)
    if kind in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=-1)
        return (packed - 128).astype(np.int8) if kind == "binary" else packed
    raise ValueError(f"not a quantized type: {kind}")


def _base64_rows(vectors: np.ndarray) -> list[str]:
    little = np.ascontiguousarray(vectors, dtype="<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]


def encode_vectors(vectors: np.ndarray, kind: EmbeddingType, ranges: np.ndarray | None = None
                   ) -> np.ndarray | list[str]:
    """The rows of one type, ready for orjson (numpy arrays serialise as lists of numbers); `ranges`: the
    model's int8/uint8 ranges (None: [-1, 1])."""
    if kind == "float":
        return np.ascontiguousarray(vectors, dtype=np.float32)
    if kind == "base64":
        return _base64_rows(vectors)
    return quantize(vectors, kind, ranges)
