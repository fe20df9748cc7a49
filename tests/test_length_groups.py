"""Cutting a padded batch into forwards of similar lengths (backends/runtime/length_groups.py): the cut is the
cheapest by its cost model, every row comes back in its place, and CPU backends use it."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from embedding_service.backends.runtime.length_groups import embed_in_groups, length_groups


def cost(lengths: Sequence[int], groups: list[list[int]], forward_cost: int) -> int:
    return sum(max(lengths[i] for i in group) * len(group) + forward_cost for group in groups)


def partitions(items: list[int]) -> list[list[list[int]]]:
    """Every set partition of `items` (Bell(n) of them: small n only)."""
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    out = []
    for smaller in partitions(rest):
        out.append([[first], *smaller])
        for index in range(len(smaller)):
            out.append([*smaller[:index], [first, *smaller[index]], *smaller[index + 1:]])
    return out


@pytest.mark.parametrize("seed", range(12))
def test_the_cut_is_the_cheapest_of_all_partitions(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.choice([3, 5, 8, 20, 40, 90]) for _ in range(rng.randint(1, 7))]
    forward_cost = rng.choice([0, 8, 64])
    groups = length_groups(lengths, forward_cost)
    assert sorted(itertools.chain.from_iterable(groups)) == list(range(len(lengths)))  # each row once
    assert all(lengths[a] <= lengths[b] for group in groups for a, b in itertools.pairwise(group))
    best = min(cost(lengths, p, forward_cost) for p in partitions(list(range(len(lengths)))))
    assert cost(lengths, groups, forward_cost) == best


def test_similar_lengths_stay_one_forward_and_mixed_ones_are_cut() -> None:
    assert length_groups([16, 17, 18, 15] * 8) == [sorted(range(32), key=lambda i: [16, 17, 18, 15][i % 4])]
    assert length_groups([]) == [[]]
    mixed = [12] * 24 + [300] * 8  # one forward: 32 x 300 = 9,600 tokens; cut: 24 x 12 + 8 x 300 + 64
    groups = length_groups(mixed)
    assert [len(g) for g in groups] == [24, 8]


def test_rows_come_back_in_the_batch_order() -> None:
    calls: list[int] = []

    def forward(batch: Sequence[Sequence[int]]) -> np.ndarray:
        calls.append(len(batch))
        longest = max(len(seq) for seq in batch)  # a row's value: its first id and its padded width
        return np.array([[seq[0], longest] for seq in batch], dtype=np.float32)

    rng = random.Random(0)
    batch = [[index, *([7] * rng.choice([2, 3, 200, 210]))] for index in range(32)]
    out = embed_in_groups(batch, forward)
    assert len(calls) > 1 and sum(calls) == 32
    assert out[:, 0].tolist() == list(range(32))  # every row in its place
    assert out[:, 1].max() > 200 and out[:, 1].min() < 10  # short rows were not padded to the long ones
    calls.clear()
    same = [[index, 7, 7] for index in range(8)]
    assert embed_in_groups(same, forward)[:, 0].tolist() == list(range(8)) and calls == [8]


def check_a_mixed_batch_is_cut(backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU backend's embed of 12 short texts beside 4 of ~300 tokens: two forwards (not 16 x 302), vectors
    within cos 0.9999 of one forward and of each text alone (MiniLM's tokenizer)."""
    texts = [f"short text number {i}" for i in range(12)] + [" ".join(["passage"] * 300)] * 4
    batch = backend.tokenize(texts)
    forward = backend._forward
    one_forward = forward(batch)
    shapes: list[tuple[int, int]] = []

    def counting(rows: Sequence[Sequence[int]]) -> np.ndarray:
        shapes.append((len(rows), max(len(r) for r in rows)))
        return forward(rows)

    monkeypatch.setattr(backend, "_forward", counting)
    grouped = backend.embed(batch)
    assert sorted(shapes) == [(4, 302), (12, 6)], shapes  # the short ones apart from the long ones
    assert float((grouped * one_forward).sum(axis=1).min()) >= 0.9999
    alone = np.concatenate([forward([ids]) for ids in batch[:1] + batch[-1:]])
    assert float((grouped[[0, -1]] * alone).sum(axis=1).min()) >= 0.9999
