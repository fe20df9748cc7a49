"""A deterministic reranker for API tests: no model. A pair scores the share of document words that are
query words, so tests can predict the order; the words hash to ids as in the fake embedding backend."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np

from ..base import BackendInfo
from ..model.pair_tokenizer import TokenPair
from .embed import FakeBackend

__all__ = ["FakeScoringBackend"]

_CLS, _SEP = 1, 2


class FakeScoringBackend:
    def __init__(self, *, model: str = "fake-reranker", max_model_len: int = 512, delay_s: float = 0.0,
                 record_batches: bool = True) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.delay_s = delay_s
        self._words = FakeBackend(vocab_size=32000, eos_token_id=None)
        self.batches: list[int] = []  # sizes of the batches scored, for tests (none when served)
        self.record_batches = record_batches
        self._lock = threading.Lock()

    def load(self) -> BackendInfo:
        return BackendInfo(model=self.model, device="cpu", dtype="float32", dimension=1,
                           max_model_len=self.max_model_len, vocab_size=32000, padded=False, engine="fake",
                           task="rerank")

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self._words.tokenize(texts)

    def encode_pairs(self, queries: Sequence[str], documents: Sequence[str],
                     instruction: str | None = None) -> list[TokenPair]:
        extra = self._words.tokenize([instruction])[0] if instruction else []
        out = []
        for query, doc in zip(queries, documents, strict=True):
            q, d = self._words.tokenize([query, doc])
            head = 2 + len(extra) + len(q)
            out.append(TokenPair([_CLS, *extra, *q, _SEP, *d, _SEP], head=head, tail=1, second_start=head))
        return out

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        with self._lock:
            if self.record_batches:
                self.batches.append(len(batch))
        if self.delay_s:
            time.sleep(self.delay_s)
        scores = np.empty((len(batch), 1), dtype=np.float32)
        for row, ids in enumerate(batch):
            start = ids.second_start if isinstance(ids, TokenPair) and ids.second_start is not None else 1
            query, doc = set(ids[1: start - 1]), list(ids[start:-1])
            scores[row, 0] = sum(1 for t in doc if t in query) / max(1, len(doc))
        return scores

    def close(self) -> None:
        pass
