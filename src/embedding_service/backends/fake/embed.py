"""A deterministic backend for API and engine tests: no model, configurable delay and faults."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..base import BackendDeadError, BackendInfo
from ..model.pooling import l2_normalize

if TYPE_CHECKING:
    from ...config import EmbeddingConfig

__all__ = ["FakeBackend", "FakeOptions"]

log = logging.getLogger("embedding_service")


@dataclass(frozen=True)
class FakeOptions:
    """Fault-injection knobs of the fake engine, so tests can drive a server process from its flags."""

    delay_s: float
    fail_batches: tuple[int, ...]
    die_after: int | None
    load_delay_s: float

    @classmethod
    def from_config(cls, settings: EmbeddingConfig) -> FakeOptions:
        return cls(delay_s=settings.fake_delay_ms / 1000.0, fail_batches=tuple(settings.fake_fail_batches),
                   die_after=settings.fake_die_after, load_delay_s=settings.fake_load_delay_ms / 1000.0)


class FakeBackend:
    """Words hash to token ids; a sequence's vector is seeded by its ids, so equal inputs give equal vectors.

    `delay_s` (+ `delay_per_token_s` x tokens) is slept per batch to imitate compute. `fail_batches` lists
    batch numbers (0-based) that raise; `die_after` makes every batch after that many raise BackendDeadError;
    `load_delay_s` is slept in `load`.
    With `record_batches` (tests) every batch's size and sequence lengths are kept in `batches` and
    `seen_lengths`; a served fake engine records none, so its memory does not grow with traffic.
    """

    def __init__(
        self,
        *,
        dimension: int = 64,
        max_model_len: int = 512,
        vocab_size: int = 32000,
        delay_s: float = 0.0,
        delay_per_token_s: float = 0.0,
        fail_batches: Sequence[int] = (),
        die_after: int | None = None,
        model: str = "fake-embedding-model",
        matryoshka: bool = True,
        eos_token_id: int | None = 2,
        load_delay_s: float = 0.0,
        padded: bool = False,  # the batch cost model it reports (False: packed, like vLLM)
        record_batches: bool = True,
    ) -> None:
        self.dimension = dimension
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.delay_s = delay_s
        self.delay_per_token_s = delay_per_token_s
        self.fail_batches = set(fail_batches)
        self.die_after = die_after
        self.model = model
        self.matryoshka = matryoshka
        self.eos_token_id = eos_token_id
        self.load_delay_s = load_delay_s
        self.padded = padded
        self.batches: list[int] = []  # sizes of the batches embedded, for tests of the batcher
        self.seen_lengths: list[list[int]] = []  # sequence lengths of each batch
        self.batch_count = 0
        self.record_batches = record_batches
        self._lock = threading.Lock()

    def load(self) -> BackendInfo:
        if self.load_delay_s:
            time.sleep(self.load_delay_s)  # a model load, uninterruptible like a real one
        return BackendInfo(
            model=self.model,
            device="cpu",
            dtype="float32",
            dimension=self.dimension,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            special_suffix=(self.eos_token_id,) if self.eos_token_id is not None else (),
            matryoshka=self.matryoshka,
            padded=self.padded,
            engine="fake",
        )

    def _word_id(self, word: str) -> int:
        digest = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=4).digest()
        return 3 + int.from_bytes(digest, "little") % (self.vocab_size - 3)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        eos = [self.eos_token_id] if self.eos_token_id is not None else []
        return [[self._word_id(word) for word in text.split()] + eos for text in texts]

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        with self._lock:
            number = self.batch_count
            self.batch_count += 1
            if self.record_batches:
                self.batches.append(len(batch))
                self.seen_lengths.append([len(ids) for ids in batch])
        log.debug("fake backend: batch %d embeds %d sequences", number, len(batch))
        if self.die_after is not None and number >= self.die_after:
            raise BackendDeadError("fake backend died")
        tokens = sum(len(ids) for ids in batch)
        if self.delay_s or self.delay_per_token_s:
            time.sleep(self.delay_s + self.delay_per_token_s * tokens)
        if number in self.fail_batches:
            raise RuntimeError(f"fake backend failure on batch {number}")
        out = np.empty((len(batch), self.dimension), dtype=np.float32)
        for row, ids in enumerate(batch):
            seed = int.from_bytes(hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(),
                                                  digest_size=8).digest(), "little")
            out[row] = np.random.default_rng(seed).standard_normal(self.dimension, dtype=np.float32)
        return l2_normalize(out)

    def close(self) -> None:
        pass
