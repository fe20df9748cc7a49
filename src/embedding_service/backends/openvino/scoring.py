"""The openvino engine for rerankers: the same scores as the torch engine (TorchScoringBackend), computed by
OpenVINO's CPU plugin from an IR exported once into the engine's cache folder.

- cross-encoder: the whole *ForSequenceClassification model (ids, mask, token types -> its one logit), then
  the model's activation in numpy.
- yes-no (Qwen3-Reranker): the base model's token states; the last real token's state times the lm_head rows
  of "no" and "yes" (saved beside the IR), softmax in numpy. Rows are padded on the right, as the embedding
  engine does for decoders (left-padded rows give NaN states in OpenVINO's attention); rotary positions make
  the scores those of the model card's left padding, up to rounding.

Always fp32 weights: `--quantize int8` is for the embedding model, the reranker keeps exact scores.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..base import TRANSFORMERS_BUILD, BackendInfo, BackendOptions
from ..model.pair_tokenizer import PairMethods, PairTokenizer, TokenPair, token_types
from ..runtime.device import resolve_cpu_dtype
from ..scoring import RerankerFacts, activate, reranker_facts
from .embed import (
    EXAMPLE_ROWS,
    cached_export,
    compile_ir,
    compile_threads,
    default_cache_dir,
    export_key,
    export_module,
    import_openvino,
    last_hidden_module,
    load_saved_tokenizer,
    pad_batch,
    require_conversion_libraries,
    save_tokenizer_state,
    tokenizer_fingerprint,
)

__all__ = ["OpenVinoScoringBackend"]

log = logging.getLogger("embedding_service")

HEAD_FILE = "yes-no-head.npy"  # (2, hidden) float32: the lm_head rows of "no" and "yes"


class OpenVinoScoringBackend(PairMethods):
    """A reranker on OpenVINO's CPU plugin; `embed` returns a batch's scores as a (n, 1) float32 column."""

    def __init__(self, options: BackendOptions) -> None:
        self._options = options
        self._model_dir = options.model_dir
        cache_dir = options.openvino_cache_dir
        self._cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self._request: Any = None
        self._head: np.ndarray | None = None
        self._pad_id = 0
        self._lock = threading.Lock()  # one InferRequest: one batch at a time
        self.facts: RerankerFacts | None = None
        self.ir_path: Path | None = None

    def load(self) -> BackendInfo:
        ov = import_openvino(self._options)
        facts = reranker_facts(self._options.facts)
        dtype = resolve_cpu_dtype(self._options.dtype)
        version = ov.get_version()
        variant = f"rerank-{facts.kind}"
        folder = self._cache_dir / export_key(self._model_dir, variant, version)
        fingerprint = tokenizer_fingerprint(self._model_dir)
        pairs = load_saved_tokenizer(folder, fingerprint, lambda state: PairTokenizer.from_state(state, facts))
        checked_now = pairs is None
        if pairs is None:
            require_conversion_libraries(self._model_dir, "transformers")
            pairs = PairTokenizer.load(self._model_dir, facts)
        self._pad_id = pairs.pad_id
        self.ir_path = cached_export(self._cache_dir, folder, self._model_dir, variant, version,
                                     lambda target: _export_reranker(self._model_dir, target, facts, pairs,
                                                                     self._pad_id))
        if checked_now:  # saved for the next starts
            save_tokenizer_state(folder, fingerprint, pairs.state())
        if facts.kind == "yes-no":
            self._head = np.load(folder / HEAD_FILE).astype(np.float32)
        self._request = compile_ir(ov, self.ir_path, dtype, "none")
        self.pairs, self.facts = pairs, facts
        limit = facts.length_limit(self._options.max_model_len)
        log.info("openvino reranker: %s (%s) on cpu (%s, %d threads), IR %s", self._options.model_label,
                 facts.kind, dtype, compile_threads(), self.ir_path)
        return BackendInfo(model=self._options.model_label, device="cpu", dtype=dtype, dimension=1,
                           max_model_len=limit, vocab_size=pairs.vocab_size, padded=True, max_concurrent_batches=1,
                           engine="openvino", task="rerank")

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Scores of a batch of TokenPairs, as a (n, 1) float32 column."""
        return self.score(batch)[:, None]

    def score(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        assert self._request is not None and self.facts is not None, "load() first"
        ids, mask = pad_batch(batch, self._pad_id)
        if self.facts.kind == "yes-no":
            assert self._head is not None
            with self._lock:
                hidden = self._request.infer({"input_ids": ids, "attention_mask": mask})[0]
            last = hidden[np.arange(len(batch)), mask.sum(axis=1) - 1].astype(np.float32)
            logits = last @ self._head.T  # (n, 2): no, yes
            return (1.0 / (1.0 + np.exp(logits[:, 0].astype(np.float64) - logits[:, 1]))).astype(np.float32)
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": token_types(batch, ids.shape[1])}
        with self._lock:
            logits = self._request.infer(inputs)[0]
        return activate(logits[:, 0], self.facts.activation)

    def close(self) -> None:
        self._request = None
        self._head = None


def _export_reranker(model_dir: str, target: Path, facts: RerankerFacts, pairs: PairTokenizer, pad: int) -> None:
    """The reranker's IR (fp32), and for yes-no its two lm_head rows beside it. torch is needed only here."""
    import torch

    if facts.kind == "yes-no":
        with TRANSFORMERS_BUILD:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        head = model.get_output_embeddings().weight[[pairs.no_id, pairs.yes_id]].detach().float().numpy()
        np.save(target.parent / HEAD_FILE, head)
        example = pad_batch(EXAMPLE_ROWS, pad)
        export_module(last_hidden_module(model.model), ("input_ids", "attention_mask"), example, target)
        return
    with TRANSFORMERS_BUILD:
        from transformers import AutoModelForSequenceClassification

        classifier = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = classifier

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    batch = [TokenPair(row, head=len(row) // 2, tail=1, second_start=len(row) // 2) for row in EXAMPLE_ROWS]
    ids, mask = pad_batch(batch, pad)
    export_module(Logits(), ("input_ids", "attention_mask", "token_type_ids"),
                  (ids, mask, token_types(batch, ids.shape[1])), target)
