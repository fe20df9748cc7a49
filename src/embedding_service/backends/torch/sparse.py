"""The torch engine for SPLADE (sparse) models, as sentence-transformers' SparseEncoder computes them
(Transformer with the fill-mask head + SpladePooling): for each vocabulary entry, the max (or sum) over the
text's tokens of log(1 + relu(logit)), padding excluded.

The vocabulary head is the cost: a 30,522-wide projection of every token, whose (batch, length, vocabulary)
logits in fp32 are 2 GB at a 16,384-token batch. So the model runs with its last projection (the output
embeddings) replaced by the identity, and the projection is applied here to the real (unpadded) tokens only,
a chunk of at most `_HEAD_CHUNK_BYTES` of logits at a time, each chunk folded at once into its texts' rows
(a running max: log1p and relu are monotonic, so max(log1p(relu(x))) is log1p(relu(max(x)))).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..base import TRANSFORMERS_BUILD, BackendInfo, BackendLoadError, BackendOptions
from ..model.tokenization import HfTokenizer
from ..sparse import (
    QuerySide,
    SparseSides,
    SparseVector,
    SpladeConfig,
    document_facts,
    pack_rows,
    sparse_layout,
    vocabulary_strings,
)
from .embed import torch_placement

__all__ = ["TorchSparseBackend", "padded_batch"]

log = logging.getLogger("embedding_service")

_HEAD_CHUNK_BYTES = 64 << 20  # logits held at once: ~550 tokens x 30,522 x fp32


class TorchSparseBackend(SparseSides):
    """A masked-LM model's SPLADE vectors with plain PyTorch under inference_mode. `embed` returns one
    SparseVector per sequence (sparse.pack_rows)."""

    def __init__(self, options: BackendOptions) -> None:
        self._options = options
        self._model: Any = None
        self._weight: Any = None  # the output embeddings: (vocabulary, hidden)
        self._bias: Any = None
        self._tokenizer: HfTokenizer | None = None
        self._device: Any = None
        self._splade = SpladeConfig()
        self._chunk = 1

    def load(self) -> BackendInfo:
        import torch

        # index_reduce_ warns once that it is "in beta": it is ten times faster than scatter_reduce_ here.
        warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta")
        opts = self._options
        device, dtype_name, torch_dtype = torch_placement(opts)
        try:
            layout = sparse_layout(opts.facts)
            with TRANSFORMERS_BUILD:
                from transformers import AutoModelForMaskedLM

                tokenizer = HfTokenizer(str(layout.document_dir))
                model = AutoModelForMaskedLM.from_pretrained(layout.document_dir, dtype=torch_dtype)
            if layout.query_dir is not None:
                self._query = QuerySide.load(layout.query_dir, tokenizer)
        except (OSError, ValueError, KeyError) as exc:
            raise BackendLoadError(f"cannot load sparse (masked-LM) model from {opts.model_dir}: {exc}") from exc
        self._layout, self._splade = layout, layout.splade
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise BackendLoadError(f"{opts.model_dir}: its masked-LM head does not end in a linear projection "
                                   f"({type(head).__name__}); this engine cannot serve it as SPLADE")
        self._weight, self._bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
        _replace_module(model, head, torch.nn.Identity())  # the model now returns the head's input
        model.eval().to(device)
        self._weight = self._weight.to(device)
        self._bias = None if self._bias is None else self._bias.to(device)
        vocabulary = int(self._weight.shape[0])
        self._chunk = max(1, _HEAD_CHUNK_BYTES // (4 * vocabulary))
        self._tokenizer, self._model, self._device = tokenizer, model, torch.device(device)
        self._strings = vocabulary_strings(tokenizer, vocabulary)
        if opts.torch_compile:
            log.info("torch sparse backend: torch_compile is not applied to SPLADE models (eager forwards)")
        log.info("torch sparse backend: %s on %s (%s), SPLADE %s/%s, vocabulary %d", opts.model_label, device,
                 dtype_name, self._splade.pooling_strategy, self._splade.activation_function, vocabulary)
        return BackendInfo(
            model=opts.model_label, device=device, dtype=dtype_name, dimension=vocabulary,
            max_model_len=document_facts(opts.facts, layout).length_limit(opts.max_model_len),
            vocab_size=tokenizer.vocab_size,
            special_prefix=tokenizer.special_prefix, special_suffix=tokenizer.special_suffix,
            prompts=opts.facts.prompts, default_prompt_name=opts.facts.default_prompt_name,
            padded=True, max_concurrent_batches=1, engine="torch", task="sparse")

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        assert self._tokenizer is not None, "load() first"
        return self._tokenizer(texts)

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        import torch

        assert self._model is not None and self._tokenizer is not None, "load() first"
        rows = len(batch)
        ids, mask = padded_batch(batch, self._tokenizer.pad_id, [len(seq) for seq in batch])
        lengths = torch.as_tensor([len(seq) for seq in batch])
        with torch.inference_mode():
            ids, mask = ids.to(self._device), mask.to(self._device)
            hidden = self._model(input_ids=ids, attention_mask=mask).logits  # the head's input (identity)
            tokens = hidden[mask.bool()]  # (all real tokens, hidden), text after text
            owner = torch.repeat_interleave(torch.arange(rows), lengths).to(self._device)
            pooled = self._pool(tokens, owner, rows)
            where = pooled.nonzero()  # (non-zeros, 2), row-major: indices ascending within each row
            values = pooled[where[:, 0], where[:, 1]].cpu().numpy()
            where_np = where.cpu().numpy()
        counts = np.bincount(where_np[:, 0], minlength=rows)
        bounds = np.concatenate(([0], np.cumsum(counts)))
        columns = where_np[:, 1].astype(np.int32)
        return pack_rows([SparseVector(columns[bounds[i]: bounds[i + 1]], values[bounds[i]: bounds[i + 1]])
                          for i in range(rows)])

    def _pool(self, tokens: Any, owner: Any, rows: int) -> Any:
        """SpladePooling over each text's tokens, the head applied chunk by chunk: (rows, vocabulary) fp32."""
        import torch

        double = self._splade.activation_function == "log1p_relu"
        out = torch.zeros((rows, self._weight.shape[0]), dtype=torch.float32, device=tokens.device)
        for start in range(0, tokens.shape[0], self._chunk):
            end = start + self._chunk
            logits = torch.nn.functional.linear(tokens[start:end], self._weight, self._bias).float()
            if self._splade.pooling_strategy == "max":  # zeros to start with: the relu comes free
                out.index_reduce_(0, owner[start:end], logits, "amax", include_self=True)
            else:
                logits = logits.relu_().log1p_()
                out.index_add_(0, owner[start:end], logits.log1p_() if double else logits)
        if self._splade.pooling_strategy == "max":
            out.log1p_()
            if double:
                out.log1p_()
        return out

    def close(self) -> None:
        self._model = None
        self._weight = self._bias = None
        self._tokenizer = None


def padded_batch(batch: Sequence[Sequence[int]], pad_id: int, attended: Sequence[int]) -> tuple[Any, Any]:
    """(ids, attention mask) of a batch, right-padded with `pad_id`; row i attends to its first attended[i]."""
    import torch

    rows, longest = len(batch), max(len(ids) for ids in batch)
    ids = torch.full((rows, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, longest), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : attended[row]] = 1
    return ids, mask


def _replace_module(model: Any, old: Any, new: Any) -> None:
    """Put `new` where `old` sits in `model`'s module tree."""
    for module in model.modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)
                return
    raise BackendLoadError(f"{type(model).__name__}: its output embeddings are not one of its modules")
