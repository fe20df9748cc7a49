"""--batch-invariant: the engine runs each input of a batch alone, rows back in order; on a real model, a
batch otherwise moves the last bits of some rows (padding and the number of rows both do), and alone it cannot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.engine.engine import EmbeddingEngine

from .conftest import backend_options, engine_options

SEQS = [[5, 6, 7], [8], [9, 10, 11], [12, 13], [14], [15, 16, 17]]


async def _run(batch_invariant: bool) -> tuple[np.ndarray, list[list[int]]]:
    backend = FakeBackend(dimension=16)
    engine = EmbeddingEngine(backend, engine_options(batch_invariant=batch_invariant))
    await engine.start()
    try:
        return engine.embed_batch(SEQS), backend.seen_lengths
    finally:
        await engine.stop()


async def test_each_input_is_its_own_backend_call_and_rows_keep_their_order() -> None:
    vectors, seen = await _run(True)
    assert seen == [[len(seq)] for seq in SEQS]
    plain, seen_plain = await _run(False)
    assert seen_plain == [[3, 1, 3, 2, 1, 3]]  # one call with every length
    np.testing.assert_array_equal(vectors, plain)  # (the fake model is exact: only the order could differ)
    assert len({row.tobytes() for row in vectors}) == len(SEQS)


@pytest.mark.slow
async def test_padding_moves_the_last_bits_and_the_setting_stops_it(minilm_dir: Path) -> None:
    """MiniLM on torch, fp32: texts of mixed lengths in one batch against each alone."""
    from embedding_service.backends.torch.embed import TorchBackend

    texts = [f"Document {i}: {'padding moves the last bits ' * (1 + i % 5)}" for i in range(24)]
    for invariant in (False, True):
        backend = TorchBackend(backend_options(minilm_dir, device="cpu", dtype="float32", max_model_len=512))
        engine = EmbeddingEngine(backend, engine_options(batch_invariant=invariant))
        await engine.start()
        try:
            seqs = engine.prepare(texts)
            together = engine.embed_batch(seqs)
            alone = np.concatenate([engine.embed_batch([seq]) for seq in seqs])
        finally:
            await engine.stop()
        np.testing.assert_allclose(together, alone, atol=1e-6)
        assert np.array_equal(together, alone) is invariant, "padding did not move a bit: the test shows nothing"
