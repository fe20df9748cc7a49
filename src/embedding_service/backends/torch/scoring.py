"""The torch engine for rerankers: Qwen3-Reranker as its model card computes it, cross-encoders as
sentence-transformers' CrossEncoder.predict does. One float per (query, document) pair.

Speaks the Backend contract so the engine's batcher, limits and lifecycle serve it unchanged: `embed`
returns the batch's scores as a (n, 1) float32 column.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..base import TRANSFORMERS_BUILD, BackendInfo, BackendLoadError, BackendOptions
from ..model.pair_tokenizer import PairMethods, PairTokenizer, token_types
from ..scoring import RerankerFacts, activate, reranker_facts
from .embed import torch_placement

__all__ = ["TorchScoringBackend"]

log = logging.getLogger("embedding_service")


class TorchScoringBackend(PairMethods):
    """A reranker run with plain PyTorch under inference_mode."""

    def __init__(self, options: BackendOptions) -> None:
        self._options = options
        self._model_dir = options.model_dir
        self._max_model_len = options.max_model_len
        self._label = options.model_label
        self._model: Any = None
        self._head: Any = None  # yes-no: the lm_head rows of "no" and "yes", (2, hidden)
        self._device: Any = None
        self.pairs: PairTokenizer | None = None
        self.facts: RerankerFacts | None = None

    def load(self) -> BackendInfo:
        import torch

        facts = reranker_facts(self._options.facts)
        device, dtype_name, torch_dtype = torch_placement(self._options)
        pairs = PairTokenizer.load(self._model_dir, facts)
        try:
            with TRANSFORMERS_BUILD:
                from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

                if facts.kind == "yes-no":
                    model = AutoModelForCausalLM.from_pretrained(self._model_dir, dtype=torch_dtype)
                else:
                    model = AutoModelForSequenceClassification.from_pretrained(self._model_dir, dtype=torch_dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise BackendLoadError(f"cannot load reranker from {self._model_dir}: {exc}") from exc
        model.eval().to(device)
        if facts.kind == "yes-no":
            # Only two logits are read: keep their lm_head rows and skip the vocabulary-wide projection.
            weight = model.get_output_embeddings().weight
            self._head = weight[[pairs.no_id, pairs.yes_id]].detach().float().clone()
            self._model = model.model
        else:
            self._model = model
        self._device, self.pairs, self.facts = torch.device(device), pairs, facts
        limit = facts.length_limit(self._max_model_len)
        log.info("torch reranker: %s (%s) on %s (%s)", self._label, facts.kind, device, dtype_name)
        return BackendInfo(model=self._label, device=device, dtype=dtype_name, dimension=1, max_model_len=limit,
                           vocab_size=pairs.vocab_size, padded=True, max_concurrent_batches=1, engine="torch",
                           task="rerank")

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Scores of a batch of TokenPairs, as a (n, 1) float32 column."""
        return self.score(batch)[:, None]

    def score(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        import torch

        assert self.facts is not None and self.pairs is not None, "load() first"
        left = self.facts.kind == "yes-no"  # the card pads on the left and reads position -1
        longest = max(len(ids) for ids in batch)
        pad = self.pairs.pad_id
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, seq in enumerate(batch):
            start = longest - len(seq) if left else 0
            ids[row, start: start + len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, start: start + len(seq)] = 1
        types = torch.from_numpy(token_types(batch, longest, left=left))
        with torch.inference_mode():
            ids, mask = ids.to(self._device), mask.to(self._device)
            if left:
                hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
                logits = hidden.float() @ self._head.to(self._device).T  # (n, 2): no, yes
                return torch.softmax(logits, dim=-1)[:, 1].cpu().numpy().astype(np.float32)
            logits = self._model(input_ids=ids, attention_mask=mask, token_type_ids=types.to(self._device)).logits
        return activate(logits[:, 0].float().cpu().numpy(), self.facts.activation)

    def close(self) -> None:
        self._model = None
        self._head = None
