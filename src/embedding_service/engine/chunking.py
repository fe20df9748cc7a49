"""Chunk-and-pool: an input over the model's limit embedded in windows, their vectors averaged.

The rule (docs/clients.md, "Long inputs"):
- An input's text ids (its special tokens and prompt taken off) are split into consecutive windows of
  `limit - len(head) - len(tail)` ids; every window is a valid model input of its own: `head` (the special
  prefix, BERT's [CLS], then the prompt or instruction) + window + `tail` (the special suffix: [SEP], Qwen3's
  <|endoftext|>, which it pools on). The prompt repeats per window because it says what the vector is for (a
  query, a passage): without it the later windows would land in another region of the space than the first.
- Each window is embedded through the model's normal batcher, so windows of one input share batches with
  other requests' inputs, and pooled the model's own way (mean, [CLS], last token).
- The input's vector is the mean of its window vectors weighted by each window's text ids (the prompt and
  special tokens, the same in every window, weigh nothing), renormalised to unit length, as every vector here
  is. vLLM's chunked processing does the same for every pooling type (a token-weighted mean); for [CLS] and
  last-token models it is the only combination that reads the whole text (the last window alone would drop
  the rest), and a window's [CLS] or end token summarises that window as it would a short text.
- Memory: a long text is tokenised slice by slice (engine/tokenize.py, `join`), never whole; its ids are
  kept once (int32, 4 bytes a token); windows are made as they are sent, and at most
  `WAVES_IN_FLIGHT` waves of at most one batch's token budget are queued or running per request, so a
  1 MB input holds no more activations than two batches would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..backends.base import BackendInfo
from ..backends.model.pooling import l2_normalize
from ..errors import ErrorKind, ServiceError
from .core import EngineCore
from .prompts import apply_prompt
from .tokenize import tokenize_bounded
from .types import EmbedRequest

__all__ = ["WAVES_IN_FLIGHT", "Windows", "embed_windows", "plan_windows"]

WAVES_IN_FLIGHT = 2  # one wave computing, the next queued behind it: the model never waits for this request


@dataclass(frozen=True)
class Windows:
    """An over-long input, embedded as `head + body[k*width:(k+1)*width] + tail` for each k."""

    head: tuple[int, ...]
    body: np.ndarray  # int32 text ids, without special tokens or prompt
    tail: tuple[int, ...]
    width: int

    @property
    def count(self) -> int:
        return -(-len(self.body) // self.width)

    @property
    def tokens(self) -> int:
        """Tokens the model embeds for this input (head and tail once per window)."""
        return len(self.body) + self.count * (len(self.head) + len(self.tail))

    def window(self, k: int) -> tuple[list[int], int]:
        """Window k's model input and its weight (its text ids)."""
        part = self.body[k * self.width:(k + 1) * self.width]
        return [*self.head, *part.tolist(), *self.tail], len(part)

    def joined(self) -> list[int]:
        """The input's ids in one piece (head and tail once): what /tokenize shows."""
        return [*self.head, *self.body.tolist(), *self.tail]


def _unwrapped(ids: list[int], info: BackendInfo) -> tuple[tuple[int, ...], list[int], tuple[int, ...]]:
    """(special prefix, text ids, special suffix) of a tokenised input."""
    prefix, suffix = info.special_prefix, info.special_suffix
    head = prefix if prefix and tuple(ids[:len(prefix)]) == prefix else ()
    tail = suffix if suffix and tuple(ids[len(ids) - len(suffix):]) == suffix else ()
    return head, ids[len(head):len(ids) - len(tail)], tail


async def plan_windows(core: EngineCore, request: EmbedRequest, info: BackendInfo, seqs: list[list[int]],
                       over: list[int], limit: int, deadline: float) -> dict[int, Windows]:
    """The windows of each over-long input (indices `over`; their `seqs` entries are emptied, the ids moving
    into the windows). A prompted text is tokenised again without its prompt, so that the prompt's own ids
    can head every window."""
    prompt: tuple[int, ...] = ()
    if request.texts is not None:
        [text] = apply_prompt([""], instruction=request.instruction, prompt_name=request.prompt_name,
                              prompts=info.prompts, default_prompt_name=info.default_prompt_name)
        if text:
            [prompted] = await core.in_tokenizer_thread(core.backend.tokenize, [text])
            prompt = tuple(_unwrapped(prompted, info)[1])
    out: dict[int, Windows] = {}
    for index in over:
        ids = seqs[index]
        if prompt and request.texts is not None:
            [ids] = await tokenize_bounded(
                [request.texts[index]], core.backend.tokenize, core.tokenizer_pool, truncate=False,
                limit=core.options.max_chunked_input_tokens, max_total=core.options.max_request_tokens,
                specials=len(info.special_prefix) + len(info.special_suffix), deadline=deadline,
                join=(len(info.special_prefix), len(info.special_suffix)))
        prefix, body, tail = _unwrapped(ids, info)
        head = (*prefix, *prompt)
        width = limit - len(head) - len(tail)
        if width < 1:
            raise ServiceError(ErrorKind.INVALID_REQUEST, f"input[{index}] cannot be chunked: the prompt and "
                               f"special tokens take {len(head) + len(tail)} of the {limit} tokens of a window; "
                               "shorten the instruction", param="input")
        out[index] = Windows(head, np.asarray(body, dtype=np.int32), tail, width)
        seqs[index] = []
    return out


def _waves(windows: dict[int, Windows], budget: int) -> Iterator[list[tuple[int, list[int], int]]]:
    """(input index, ids, weight) of every window, made lazily, in groups of at most `budget` tokens (at
    least one window)."""
    wave: list[tuple[int, list[int], int]] = []
    tokens = 0
    for index, item in windows.items():
        for k in range(item.count):
            ids, weight = item.window(k)
            if wave and tokens + len(ids) > budget:
                yield wave
                wave, tokens = [], 0
            wave.append((index, ids, weight))
            tokens += len(ids)
    if wave:
        yield wave


async def embed_windows(core: EngineCore, seqs: list[list[int]], windows: dict[int, Windows], dimension: int,
                        deadline: float) -> tuple[np.ndarray, float, float]:
    """Rows for `seqs`, the inputs in `windows` chunked and pooled: (rows, queue seconds, compute seconds)."""
    rows = np.zeros((len(seqs), dimension), dtype=np.float32)
    sums = {index: np.zeros(dimension, dtype=np.float64) for index in windows}
    waited, computed = [0.0], [0.0]
    slots = asyncio.Semaphore(WAVES_IN_FLIGHT)

    async def whole(indices: list[int]) -> None:
        vectors, queued, compute = await core.submit([seqs[i] for i in indices], deadline)
        rows[indices] = vectors
        waited[0], computed[0] = max(waited[0], queued), computed[0] + compute

    async def wave(items: list[tuple[int, list[int], int]]) -> None:
        try:
            vectors, queued, compute = await core.submit([ids for _, ids, _ in items], deadline)
        finally:
            slots.release()
        for (index, _, weight), vector in zip(items, vectors, strict=True):
            sums[index] += weight * vector.astype(np.float64)
        waited[0], computed[0] = max(waited[0], queued), computed[0] + compute

    budget = core.batch_policy.max_batch_tokens if core.batch_policy is not None else core.options.max_batch_tokens
    short = [index for index in range(len(seqs)) if index not in windows]
    async with asyncio.TaskGroup() as group:
        if short:
            group.create_task(whole(short))
        for items in _waves(windows, budget):
            await slots.acquire()
            group.create_task(wave(items))
    for index, total in sums.items():
        rows[index] = l2_normalize(total)
    return rows, waited[0], computed[0]
