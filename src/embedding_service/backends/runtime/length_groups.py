"""Splitting one padded batch into forwards of similar lengths, where that computes less.

A padded backend computes every row to the batch's longest sequence. The batcher already gathers queued texts
of similar lengths, but one request of 32 texts is one batch: texts of 5 to 40 tokens cost 32 x 40. On a CPU a
forward of fewer rows costs about as much per token as a big one, so sorting the rows by length and cutting
them into groups costs the padded tokens of each group plus a fixed cost per forward. The cut is the one that
minimises that sum (a dynamic programme over the sorted lengths: O(n^2), ~0.2 ms of Python for 32 rows,
skipped when the batch's whole padding is no more than one forward's cost: no cut could pay for itself). GPUs pay a
launch cost per forward that this model does not know, so only CPU runtimes use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["FORWARD_COST_TOKENS", "embed_in_groups", "length_groups"]

# A forward's fixed cost, in tokens of compute (thread start, the graph's per-call work, small GEMMs' lower
# efficiency): a cut saves padding only when it saves more than this. Measured in bench/RESULTS.md ("Padding").
FORWARD_COST_TOKENS = 64


def length_groups(lengths: Sequence[int], forward_cost: int = FORWARD_COST_TOKENS) -> list[list[int]]:
    """The rows' indices in groups (each group's rows in ascending length) that minimise the padded tokens
    computed plus `forward_cost` per group. One group when cutting saves nothing."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    if len(order) <= 1 or sorted_lengths[-1] * len(order) - sum(sorted_lengths) <= forward_cost:
        return [order]  # (a cut adds a forward's cost and saves at most the padding)
    # best[j]: the least cost of the first j sorted rows; cut[j]: where its last group starts.
    best = [0] * (len(order) + 1)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = sorted_lengths[end - 1]  # the group start..end-1 pads to its last (longest) row
        best[end], cut[end] = min((best[start] + longest * (end - start) + forward_cost, start)
                                  for start in range(end))
    groups: list[list[int]] = []
    end = len(order)
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    groups.reverse()
    return groups


def embed_in_groups(batch: Sequence[Sequence[int]], forward: Callable[[Sequence[Sequence[int]]], np.ndarray],
                    forward_cost: int = FORWARD_COST_TOKENS) -> np.ndarray:
    """`forward`'s rows for `batch`, computed in the groups `length_groups` picks, in the batch's order."""
    groups = length_groups([len(seq) for seq in batch], forward_cost)
    if len(groups) == 1:
        return forward(batch)  # (as it came: no copy, no reorder)
    parts = [forward([batch[i] for i in group]) for group in groups]
    out = np.empty((len(batch), *parts[0].shape[1:]), dtype=parts[0].dtype)
    for group, part in zip(groups, parts, strict=True):
        out[group] = part
    return out
