"""The torch engine's compiled path (torch_compile): bucket shapes, and vectors equal to eager ones on CPU.

On a GPU the same path replays CUDA graphs; that was measured on a lent H200 (bench/RESULTS.md, session 33),
not here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedding_service.backends.torch.embed import TorchBackend, bucket

from .conftest import backend_options

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")

SHORT = ["what is the capital of China?", "Explain gravity", "hi"]
LONG = [" ".join(f"word{i % 97} token{i % 13}" for i in range(60))]


def test_buckets_hold_their_input_with_at_most_a_third_of_padding() -> None:
    sizes = [bucket(n, 2) for n in range(1, 300)]
    assert sizes[:12] == [2, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12]
    for n, size in enumerate(sizes, start=1):
        assert size >= n and (n < 2 or size <= 1.5 * n), (n, size)
    assert len(set(sizes)) == 16  # few shapes: few compiled graphs
    assert bucket(3, 16) == 16 and bucket(17, 16) == 24


@pytest.mark.parametrize("model", ["tiny-qwen3", "minilm"])
def test_compiled_forwards_equal_eager_ones(model: str, tiny_qwen_dir: Path, minilm_dir: Path) -> None:
    """torch_compile pads batches to bucket shapes (copies of the first row, more padding on the side the
    model pads) and runs the compiled model: in fp32 the vectors equal the eager ones (left-padded last-token
    Qwen3, right-padded mean-pooled BERT), for every batch shape, without a compile per shape."""
    model_dir = tiny_qwen_dir if model == "tiny-qwen3" else minilm_dir
    eager = TorchBackend(backend_options(model_dir, device="cpu", dtype="float32", max_model_len=512))
    compiled = TorchBackend(backend_options(model_dir, device="cpu", dtype="float32", max_model_len=512,
                                            torch_compile=True))
    eager.load()
    compiled.load()
    assert compiled._compiled is not None and eager._compiled is None
    texts = [*SHORT, *LONG, "Ünïcödé façade — 東京タワー 😀", "x " * 100, "", "The new movie is awesome"]
    torch._dynamo.utils.counters.clear()
    for size in (1, 2, 3, 5, 8):
        batch = eager.tokenize(texts[:size])
        got, want = compiled.embed(batch), eager.embed(batch)
        assert got.shape == want.shape == (size, want.shape[1])
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    assert np.ptp(want @ want.T) > 0.05  # the vectors differ: equality above means something
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # compiled at load, reused after
