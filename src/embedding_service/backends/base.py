"""The backend contract: load a model, tokenize, embed a batch of token ids into L2-normalised float32."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Backend", "BackendDeadError", "BackendInfo", "BackendLoadError"]


class BackendLoadError(RuntimeError):
    """The model could not be loaded (bad path, no copy and no hub, unsupported model, out of memory)."""


class BackendDeadError(RuntimeError):
    """The backend can no longer serve (its worker process died); the engine turns unhealthy."""


@dataclass(frozen=True)
class BackendInfo:
    """What the engine and the API need to know about a loaded model."""

    model: str  # what was loaded (hub id or directory)
    device: str  # "cpu" or "cuda"
    dtype: str  # the dtype actually used
    dimension: int
    max_model_len: int
    vocab_size: int
    # Special tokens the tokenizer adds around every text (Qwen3: <|endoftext|> after; BERT: [CLS] before,
    # [SEP] after). Token-id inputs lacking them get them added, so that ids and text give the same vector.
    special_prefix: tuple[int, ...] = ()
    special_suffix: tuple[int, ...] = ()
    matryoshka: bool = False
    # sentence-transformers prompts (name -> prefix) and the one applied by default, if any.
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    # Cost model for the batcher's token budget: padded backends pay max_len x n, others the sum.
    padded: bool = True
    # How many batches may be in flight at once (vLLM schedules several itself; torch runs one).
    max_concurrent_batches: int = 1
    engine: str = "torch"


@runtime_checkable
class Backend(Protocol):
    """A model runtime. Methods are blocking; the engine calls them off the event loop."""

    def load(self) -> BackendInfo: ...

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, special tokens included, not truncated."""
        ...

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """One row per sequence: float32, shape (len(batch), dimension), each row of unit L2 norm."""
        ...

    def close(self) -> None: ...
