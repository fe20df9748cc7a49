"""Rerankers on vLLM, through the same engine driving as embeddings (vllm_backend.VllmBackend).

- Qwen3-Reranker: loaded as Qwen3ForSequenceClassification with classifier_from_token ["no", "yes"] and
  is_original_qwen3_reranker (vLLM then builds a one-logit head from the lm_head rows, yes - no, and its
  sigmoid is softmax(no, yes)[yes]). We send the card's template as token ids, so no chat template is needed.
- cross-encoders (BertForSequenceClassification, ...): vLLM's own head and sentence-transformers activation;
  the token types travel as the index where the document starts (vLLM's compressed_token_type_ids).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..base import BackendInfo, BackendOptions
from ..model.pair_tokenizer import PairMethods, PairTokenizer, TokenPair
from ..scoring import RerankerFacts, reranker_facts
from .embed import VllmBackend

__all__ = ["QWEN3_RERANKER_OVERRIDES", "VllmScoringBackend"]

log = logging.getLogger("embedding_service")

# What `vllm serve Qwen/Qwen3-Reranker-0.6B` needs (vLLM's examples/pooling/score/qwen3_reranker_*.py).
QWEN3_RERANKER_OVERRIDES: dict[str, Any] = {
    "architectures": ["Qwen3ForSequenceClassification"],
    "classifier_from_token": ["no", "yes"],
    "is_original_qwen3_reranker": True,
}


class VllmScoringBackend(PairMethods, VllmBackend):
    _task = "classify"

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.pairs: PairTokenizer | None = None
        self.facts: RerankerFacts | None = None

    def load(self) -> BackendInfo:
        device, dtype = self._platform()
        facts = reranker_facts(self._options.facts)
        pairs = PairTokenizer.load(self._model_dir, facts)
        self.pairs, self.facts = pairs, facts
        opts = self._options
        max_model_len = facts.length_limit(opts.max_model_len)
        args = self._engine_args(dtype, max_model_len)
        args.pop("pooler_config")  # the classifier's own pooling (last token; BERT's pooler) and activation
        args["hf_overrides"] = dict(QWEN3_RERANKER_OVERRIDES) if facts.kind == "yes-no" else {}
        self._boot(args, device, pairs(["probe"], ["probe"])[0])
        core = self._core
        assert core is not None  # set by _boot
        log.info("vLLM reranker: %s (%s) on %s (%s), max_model_len=%d, engine core %s", opts.model_label,
                 facts.kind, device, dtype, max_model_len, core.where)
        return BackendInfo(model=opts.model_label, device=device, dtype=dtype, dimension=1,
                           max_model_len=max_model_len, vocab_size=pairs.vocab_size, padded=False,
                           max_concurrent_batches=core.concurrent_batches, engine="vllm", task="rerank")

    def _params(self, ids: Sequence[int], dimensions: int | None) -> Any:
        from vllm import PoolingParams

        second = ids.second_start if isinstance(ids, TokenPair) else None
        extra = {"compressed_token_type_ids": second} if second is not None else None
        return PoolingParams(task="classify", extra_kwargs=extra)

    def _output(self, rows: list[np.ndarray]) -> np.ndarray:
        return np.asarray([row.reshape(-1)[0] for row in rows], dtype=np.float32)[:, None]
