"""Typed vectors equal sentence-transformers' quantize_embeddings byte for byte, with the fixed [-1, 1] ranges."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from embedding_service.backends.model.pooling import l2_normalize
from embedding_service.vector_types import encode_vectors, quantize, unit_ranges

st_quantization = pytest.importorskip("sentence_transformers.util.quantization")


def _unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32))


@pytest.mark.parametrize("dim", [8, 64, 384, 1024])
@pytest.mark.parametrize("kind", ["int8", "uint8", "binary", "ubinary"])
def test_equal_to_sentence_transformers(kind: str, dim: int) -> None:
    vectors = _unit(50, dim, seed=dim)
    vectors[0] = 0.0
    vectors[0, 0] = 1.0  # the range's end: a one-hot unit vector
    vectors[1] = -vectors[0]  # and its start
    ranges = unit_ranges(dim) if kind.endswith("int8") else None
    expected = st_quantization.quantize_embeddings(vectors, precision=kind, ranges=ranges)
    got = quantize(vectors, kind)  # type: ignore[arg-type]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.tobytes() == expected.tobytes()


def test_a_vector_s_bytes_do_not_depend_on_the_batch() -> None:
    vectors = _unit(20, 64)
    for kind in ("int8", "uint8", "binary", "ubinary"):
        whole = quantize(vectors, kind)  # type: ignore[arg-type]
        alone = np.concatenate([quantize(vectors[i:i + 1], kind) for i in range(20)])  # type: ignore[arg-type]
        assert whole.tobytes() == alone.tobytes()


def test_int8_spans_the_range_and_keeps_the_ranking() -> None:
    rng = np.random.default_rng(3)  # texts near a topic: similarities spread over [0, 1], as real ones do
    topic = rng.standard_normal(384, dtype=np.float32)
    vectors = l2_normalize(topic + rng.uniform(0.3, 3, (200, 1)) * rng.standard_normal((200, 384), dtype=np.float32))
    int8 = quantize(vectors, "int8").astype(np.int32)
    assert int8.min() >= -128 and int8.max() <= 127
    exact = vectors[1:] @ vectors[0]
    approx = int8[1:] @ int8[0]
    assert np.corrcoef(exact, approx)[0, 1] > 0.99  # a dot product of the bytes ranks like the floats'


def test_binary_is_the_sign_bits() -> None:
    vectors = np.array([[0.5, -0.5, 0.0, 0.1, -0.1, 0.2, 0.3, -0.9, 0.4]], dtype=np.float32)
    ubinary = quantize(vectors, "ubinary")
    assert ubinary.tolist() == [[0b10010110, 0b10000000]]  # 9 dimensions: the last byte padded with 0 bits
    assert quantize(vectors, "binary").tolist() == [[0b10010110 - 128, 0]]


def test_base64_is_little_endian_float32() -> None:
    vectors = _unit(3, 16)
    rows = encode_vectors(vectors, "base64")
    decoded = np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in rows])
    assert decoded.tobytes() == vectors.astype("<f4").tobytes()
