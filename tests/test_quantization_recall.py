"""The recall benchmark's metrics on small known rankings (bench/studies/quantization_recall.py)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.studies.quantization_recall import rank_metrics


def test_recall_and_mrr_on_known_ranks() -> None:
    scores = np.array([
        [0.9, 0.1, 0.2],  # query 0: its document first
        [0.8, 0.5, 0.1],  # query 1: its document second
        [0.3, 0.3, 0.3],  # query 2: ties with two others: counted as third
    ])
    assert rank_metrics(scores, k=1) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert rank_metrics(scores, k=2) == (pytest.approx(2 / 3), pytest.approx((1 + 1 / 2) / 3))
    assert rank_metrics(scores, k=3) == (pytest.approx(1.0), pytest.approx((1 + 1 / 2 + 1 / 3) / 3))
