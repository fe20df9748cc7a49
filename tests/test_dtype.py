"""The dtype that really runs, and what it costs, on every kind of CPU these machines have.

The exactness tests elsewhere pin `--dtype float32`. Here servers run the default dtype (float16, which on a CPU
runs as bf16 where the CPU has native bf16, else as fp32) under each kind of CPU, chosen with the test override
EMBEDDING_TEST_CPU_FLAGS, so that one machine checks the choice that every CI machine makes:

- fp32 (AVX2-only CPUs): a text's vector does not depend on its batch, and equals sentence-transformers in fp32
  (up to rounding: cos >= 0.99999, elements within 1e-4).
- bf16 (AVX-512 BF16, AMX): both hold by cosine, to bounds measured on an AMX Xeon (docs/dtype.md): on these
  24 texts, batch vs alone min cos 0.99997 (MiniLM) / 0.99996 (tiny Qwen3), bf16 vs the fp32 reference min cos
  0.99990 / 0.99997. The bounds below leave room for other CPUs' bf16 kernels.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from embedding_service.backends.runtime import device
from testkit.random_models import generated_corpus

from .conftest import ServerProcess

pytestmark = pytest.mark.slow

CPU_KINDS = {  # what /proc/cpuinfo says on each kind, as far as the dtype choice reads it -> what must run
    "avx2": ("fma avx2", "float32"),
    "avx512-bf16": ("fma avx2 avx512f avx512_bf16", "bfloat16"),
    "amx": ("fma avx2 avx512f avx512_bf16 amx_tile amx_bf16", "bfloat16"),
}
SERVED = [("minilm", "avx2"), ("minilm", "amx"), ("tiny-qwen3", "avx2"), ("tiny-qwen3", "amx")]
BF16_BATCH_MIN_COS = 0.9995
BF16_REFERENCE_MIN_COS = 0.999
# fp32 is equal up to rounding: a batch's shapes (left padding) and each run's buffers pick other kernels and
# summation orders. Elements moved by up to 2.8e-5 in one CI run (tiny Qwen3, batch vs alone), cos 1 - 1e-8;
# bf16 moves them by ~1e-3, cos 0.9999.
FP32_MIN_COS = 0.99999
FP32_ATOL = 1e-4


def _texts(count: int = 24) -> list[str]:
    corpus = " ".join(generated_corpus(words=20_000, seed=1)).split()
    rng = np.random.default_rng(0)
    texts = []
    for _ in range(count):
        n = int(rng.integers(3, 60))
        start = int(rng.integers(0, len(corpus) - n))
        texts.append(" ".join(corpus[start : start + n]))
    return texts


TEXTS = _texts()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))


def _vectors(url: str, inputs: list[str]) -> np.ndarray:
    response = httpx.post(url + "/v1/embeddings", json={"input": inputs}, timeout=120)
    assert response.status_code == 200, response.text
    return np.asarray([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


@pytest.mark.parametrize(("kind", "flags_and_dtype"), list(CPU_KINDS.items()))
def test_override_picks_the_dtype_each_cpu_kind_runs(
    kind: str, flags_and_dtype: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    flags, expected = flags_and_dtype
    monkeypatch.setenv(device.CPU_FLAGS_OVERRIDE_ENV, flags)
    device.cpu_flags.cache_clear()
    try:
        assert device.resolve_cpu_dtype("float16") == expected
        assert device.resolve_cpu_dtype("float32") == "float32"
    finally:
        device.cpu_flags.cache_clear()


@pytest.fixture(scope="module")
def servers(tiny_qwen_dir: Path, minilm_dir: Path) -> Iterator[dict[tuple[str, str], ServerProcess]]:
    model_args = {"minilm": ["--demo"], "tiny-qwen3": ["--model-path", str(tiny_qwen_dir)]}
    started = {
        (model, kind): ServerProcess(
            # the default dtype (float16); no result cache: "alone" must be computed alone, not the batch's vector
            ["--engine", "torch", *model_args[model], "--result-cache-bytes", "0"],
            env={device.CPU_FLAGS_OVERRIDE_ENV: CPU_KINDS[kind][0]},
        )
        for model, kind in SERVED
    }
    try:
        for server in started.values():
            server.wait_healthy(240)
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def references(tiny_qwen_dir: Path, minilm_dir: Path) -> dict[str, np.ndarray]:
    """sentence-transformers in fp32, each text alone: the model card's way to get a vector."""
    st = pytest.importorskip("sentence_transformers")
    out = {}
    for name, folder in (("minilm", minilm_dir), ("tiny-qwen3", tiny_qwen_dir)):
        model = st.SentenceTransformer(str(folder), device="cpu")
        out[name] = np.stack([model.encode([text], normalize_embeddings=True)[0] for text in TEXTS])
    return out


@pytest.mark.parametrize(("model", "kind"), SERVED)
def test_default_dtype_vectors_per_cpu_kind(
    model: str, kind: str, servers: dict[tuple[str, str], ServerProcess], references: dict[str, np.ndarray]
) -> None:
    server = servers[(model, kind)]
    expected_dtype = CPU_KINDS[kind][1]
    assert httpx.get(server.url + "/health", timeout=30).json()["dtype"] == expected_dtype
    batched = _vectors(server.url, TEXTS)
    alone = np.concatenate([_vectors(server.url, [text]) for text in TEXTS])
    reference = references[model]
    # The fixture must tell texts apart, or agreeing with the reference would prove nothing.
    similarity = reference @ reference.T
    assert similarity[~np.eye(len(TEXTS), dtype=bool)].max() < 0.99
    if expected_dtype == "float32":
        for got, want in ((batched, alone), (alone, reference)):
            assert _cos(got, want).min() >= FP32_MIN_COS
            np.testing.assert_allclose(got, want, atol=FP32_ATOL)
    else:
        print(f"{model} bf16: batch vs alone min cos {_cos(batched, alone).min():.6f}, "
              f"vs fp32 reference min cos {_cos(alone, reference).min():.6f}")
        assert _cos(batched, alone).min() >= BF16_BATCH_MIN_COS
        assert _cos(alone, reference).min() >= BF16_REFERENCE_MIN_COS
        assert _cos(batched, reference).min() >= BF16_REFERENCE_MIN_COS
        # bf16 really ran: its vectors are not the fp32 ones
        assert np.abs(alone - reference).max() > 1e-5
