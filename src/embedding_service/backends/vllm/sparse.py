"""SPLADE (sparse) models on vLLM 0.32: its `BertSpladeSparseEmbeddingModel` (a BERT masked-LM whose `embed`
pooler is log1p(relu(mlm_head(h))), max over the tokens), through the same engine driving as embeddings
(VllmBackend: in-process or separate engine core, the in-process turn lock, pre-tokenised ids).

vLLM answers a dense vocabulary-sized row per text; its non-zeros become the SparseVector the contract wants.
What vLLM cannot serve the same as sentence-transformers' SparseEncoder is refused at start, in one line
(`splade_refusal`): a backbone other than BERT, sum pooling or log1p_relu (its pooler is built max/relu), and
a checkpoint whose masked-LM head is not saved under the names vLLM's loader maps (a decoder tied to the word
embeddings, LayerNorm gamma/beta: SPLADE-tiny-msmarco). vLLM drops [CLS]/[SEP] before pooling where config.json
names their ids; SpladePooling pools every attended token, so the override below unnames them.
An inference-free query side (a Router's SparseStaticEmbedding) is a lookup without a forward, as on torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..base import BackendInfo, BackendLoadError, BackendOptions
from ..model.facts import ModelFacts, safetensors_headers
from ..model.tokenization import HfTokenizer
from ..sparse import (
    QuerySide,
    SparseLayout,
    SparseSides,
    document_facts,
    nonzeros,
    pack_rows,
    sparse_layout,
    vocabulary_strings,
)
from .embed import VllmBackend

__all__ = ["SPLADE_OVERRIDES", "VllmSparseBackend", "splade_refusal"]

log = logging.getLogger("embedding_service")

# vLLM's SPLADE model, chosen over the folder's BertForMaskedLM; no [CLS]/[SEP] ids, so that every attended
# token is pooled, as SpladePooling does.
SPLADE_OVERRIDES: dict[str, Any] = {"architectures": ["BertSpladeSparseEmbeddingModel"], "cls_token_id": None,
                                    "sep_token_id": None}
# The masked-LM head's tensors vLLM 0.32's BertSpladeSparseEmbeddingModel.load_weights maps (after a "bert." or
# "model." prefix); one missing leaves its head unloaded, and vLLM stops.
_HEAD_TENSORS = tuple(f"cls.predictions.{name}" for name in (
    "transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight", "transform.LayerNorm.bias",
    "decoder.weight", "decoder.bias"))


class VllmSparseBackend(SparseSides, VllmBackend):
    """A BERT SPLADE model's vectors through vLLM. `embed` returns one SparseVector per sequence (pack_rows)."""

    _task = "embed"

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self._width = 0  # the vocabulary vLLM's head answers

    def load(self) -> BackendInfo:
        opts = self._options
        device, dtype = self._platform()
        try:
            layout = sparse_layout(opts.facts)
        except ValueError as exc:
            raise BackendLoadError(f"cannot load sparse (masked-LM) model from {opts.model_dir}: {exc}") from exc
        facts = document_facts(opts.facts, layout)
        refusal = splade_refusal(facts, layout)
        if refusal is not None:
            raise BackendLoadError(f"engine vllm cannot serve {opts.model_dir} as SPLADE: {refusal}; use engine: "
                                   "torch (docs/sparse.md)")
        self._model_dir = str(layout.document_dir)
        try:
            tokenizer = HfTokenizer(self._model_dir)
            if layout.query_dir is not None:
                self._query = QuerySide.load(layout.query_dir, tokenizer)
        except (OSError, ValueError, KeyError) as exc:
            raise BackendLoadError(f"cannot load sparse (masked-LM) model from {opts.model_dir}: {exc}") from exc
        self._tokenizer, self._layout = tokenizer, layout
        max_model_len = facts.length_limit(opts.max_model_len)
        args = self._engine_args(dtype, max_model_len)
        args.pop("pooler_config")  # the SPLADE pooler is the model's own
        args["hf_overrides"] = dict(SPLADE_OVERRIDES)
        self._boot(args, device, [*tokenizer.special_prefix, 0, *tokenizer.special_suffix])
        core = self._core
        assert core is not None  # set by _boot
        self._strings = vocabulary_strings(tokenizer, self._width)
        log.info("vLLM sparse backend: %s on %s (%s), SPLADE max/relu, vocabulary %d, max_model_len=%d, engine "
                 "core %s", opts.model_label, device, dtype, self._width, max_model_len, core.where)
        return BackendInfo(
            model=opts.model_label, device=device, dtype=dtype, dimension=self._width, max_model_len=max_model_len,
            vocab_size=tokenizer.vocab_size, special_prefix=tokenizer.special_prefix,
            special_suffix=tokenizer.special_suffix, prompts=opts.facts.prompts,
            default_prompt_name=opts.facts.default_prompt_name, padded=False,
            max_concurrent_batches=core.concurrent_batches, engine="vllm", task="sparse")

    def _output(self, rows: list[np.ndarray]) -> np.ndarray:
        self._width = int(rows[0].shape[-1]) if rows else self._width
        return pack_rows([nonzeros(row.reshape(-1)) for row in rows])


def splade_refusal(facts: ModelFacts, layout: SparseLayout) -> str | None:
    """Why vLLM 0.32 would not give this masked-LM folder SparseEncoder's vectors (None: it would)."""
    if facts.model_type != "bert" or "BertForMaskedLM" not in facts.architectures:
        return (f"vLLM's SPLADE model (BertSpladeSparseEmbeddingModel) is a BERT masked-LM; this folder is "
                f"{facts.model_type} {list(facts.architectures)}")
    splade = layout.splade
    if (splade.pooling_strategy, splade.activation_function) != ("max", "relu"):
        return (f"SpladePooling {splade.pooling_strategy}/{splade.activation_function}: vLLM's pooler computes "
                "max/relu only")
    names = _checkpoint_tensors(layout.document_dir)
    missing = [name for name in _HEAD_TENSORS if names is not None and name not in names]
    if missing:
        return (f"its checkpoint lacks {', '.join(missing)}, which vLLM's loader needs for the masked-LM head "
                "(a decoder tied to the word embeddings, or LayerNorm saved as gamma/beta)")
    return None


def _checkpoint_tensors(folder: Path) -> set[str] | None:
    """The tensor names of the folder's *.safetensors files, without "bert."/"model." (from their headers only;
    None where there are none to read)."""
    files = sorted(folder.glob("*.safetensors"))
    headers = safetensors_headers(files) if files else None
    if headers is None:  # none, or unreadable here: vLLM's loader will say what is wrong
        return None
    names: set[str] = set()
    for header in headers:
        for name in header:
            for prefix in ("model.", "bert."):
                name = name.removeprefix(prefix)
            names.add(name)
    return names
