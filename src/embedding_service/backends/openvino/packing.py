"""Several texts per row for causal decoders on OpenVINO: no compute spent on padding.

A padded batch computes every text to the batch's longest: 16 texts of 14-23 tokens cost 16 x 23. Packed, the
texts sit end to end in one row, each text's positions restarting at 0 and its tokens seeing only its own
earlier tokens (a block-diagonal causal mask, built inside the graph from per-token segment ids), so the row
costs the texts' own tokens plus attention over the row. On the full-size Qwen3 shape (int8, 2 cores) that batch
took 428-432 ms packed against 483-487 ms padded, with the same last-token states (bench/RESULTS.md).

A batch gets as many rows as its tokens fill at `ROW_TOKENS` a row (attention and the mask grow with a row's
length squared), filled evenly, as every row is computed to the longest row's width; a text longer than that
is alone in its row (as long as the text: no longer than a padded batch would make it).
Padding at a row's end is a segment of its own: a position that may attend to nothing would give NaN, which
attention leaks through 0 x NaN into real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["ROW_TOKENS", "PackedBatch", "packed_module", "plan_rows"]

ROW_TOKENS = 512
_PAD_SEGMENT = -1


def plan_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Texts' indices per row: as few rows as `row_tokens` allows, evenly filled (longest text first, each into
    the least filled row), since every row is computed to the longest row's width."""
    count = max(1, -(-sum(lengths) // row_tokens))
    rows: list[list[int]] = [[] for _ in range(count)]
    filled = [0] * count
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = min(range(count), key=filled.__getitem__)
        rows[row].append(index)
        filled[row] += lengths[index]
    return [row for row in rows if row]


class PackedBatch:
    """A batch's packed inputs, and where each text's last token lands."""

    def __init__(self, batch: Sequence[Sequence[int]], pad_id: int, row_tokens: int | None = None) -> None:
        rows = plan_rows([len(seq) for seq in batch], row_tokens or ROW_TOKENS)
        width = max(sum(len(batch[i]) for i in row) for row in rows)
        self.input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        self.position_ids = np.zeros((len(rows), width), dtype=np.int64)
        self.segment_ids = np.full((len(rows), width), _PAD_SEGMENT, dtype=np.int64)
        self.last_row = np.empty(len(batch), dtype=np.int64)
        self.last_col = np.empty(len(batch), dtype=np.int64)
        for r, row in enumerate(rows):
            start = 0
            for index in row:
                seq, end = batch[index], start + len(batch[index])
                self.input_ids[r, start:end] = seq
                self.position_ids[r, start:end] = np.arange(len(seq))
                self.segment_ids[r, start:end] = index
                self.last_row[index], self.last_col[index] = r, end - 1
                start = end

    def inputs(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "segment_ids": self.segment_ids}

    def last_states(self, hidden: np.ndarray) -> np.ndarray:
        """Each text's last-token state, in the batch's order."""
        return np.asarray(hidden[self.last_row, self.last_col], dtype=np.float32)


def packed_module(model: Any) -> Any:
    """`model`'s token states as a module of (input_ids, position_ids, segment_ids): the block-diagonal causal
    mask is made in the graph, so no L x L input crosses into the runtime."""
    import torch

    class Packed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: Any, position_ids: Any, segment_ids: Any) -> Any:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            causal = positions[:, None] >= positions[None, :]
            allowed = (segment_ids[:, None, :, None] == segment_ids[:, None, None, :]) & causal
            mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
            return self.inner(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                              use_cache=False).last_hidden_state

    return Packed()
