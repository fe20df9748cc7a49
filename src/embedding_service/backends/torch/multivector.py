"""The torch engine for multi-vector (ColBERT) models, as PyLate's `ColBERT.encode` computes them: the
encoder's last hidden states through the model's projection(s), each token's vector normalised.

The engine hands in sequences already marked ([Q]/[D] after the first token) and, for queries, expanded
with mask tokens (`mark`): an expanded query is attended to up to its closing special token, the mask tokens
after it only with attend_to_expansion_tokens. `embed` returns every position's vector (an (n, 1) object
array, one (tokens, dim) float32 matrix per sequence); the engine drops a document's skip-list tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..base import TRANSFORMERS_BUILD, BackendInfo, BackendLoadError, BackendOptions
from ..model.tokenization import HfTokenizer
from ..multivector import ColbertConfig, colbert_config
from .embed import torch_placement
from .sparse import padded_batch

__all__ = ["TorchMultiVectorBackend"]

log = logging.getLogger("embedding_service")


class TorchMultiVectorBackend:
    """A PyLate ColBERT model with plain PyTorch under inference_mode."""

    def __init__(self, options: BackendOptions) -> None:
        self._options = options
        self._model: Any = None
        self._layers: list[tuple[Any, Any]] = []  # (weight, bias or None) of each projection
        self._tokenizer: HfTokenizer | None = None
        self._device: Any = None
        self.config = ColbertConfig()
        self.skiplist: frozenset[int] = frozenset()
        self._markers: tuple[int | None, int | None] = (None, None)  # (query, document) ids; None: no marker
        self._expansion_id = 0
        self._closing: int | None = None  # the last special token of every text ([SEP])
        self._positions = 1 << 30  # the longest sequence the model takes (set by load)

    def load(self) -> BackendInfo:
        import torch
        from safetensors.torch import load_file

        opts = self._options
        device, dtype_name, torch_dtype = torch_placement(opts)
        try:
            config = colbert_config(opts.facts)
            with TRANSFORMERS_BUILD:
                from transformers import AutoModel

                tokenizer = HfTokenizer(opts.model_dir)
                model = AutoModel.from_pretrained(opts.model_dir, dtype=torch_dtype)
            layers = []
            for layer in config.layers:
                weights = load_file(str(layer.path / "model.safetensors"))
                layers.append((weights["linear.weight"], weights.get("linear.bias") if layer.bias else None))
        except (OSError, ValueError, KeyError) as exc:
            raise BackendLoadError(f"cannot load multi-vector (ColBERT) model from {opts.model_dir}: {exc}") from exc
        hf = tokenizer.tokenizer
        self._markers = (self._marker_id(hf, config.query_prefix), self._marker_id(hf, config.document_prefix))
        # PyLate pads (expands) with the mask token, else end-of-sequence (decoders), else the pad token.
        for candidate in (hf.mask_token_id, hf.eos_token_id, hf.pad_token_id):
            if candidate is not None:
                self._expansion_id = int(candidate)
                break
        self._closing = tokenizer.special_suffix[-1] if tokenizer.special_suffix else None
        if config.do_query_expansion and not config.attend_to_expansion_tokens and self._closing is None:
            raise BackendLoadError(f"{opts.model_dir}: its tokenizer closes texts with no special token, so a "
                                   "query's expansion cannot be told from its text; not served")
        self.skiplist = frozenset(int(hf.convert_tokens_to_ids(word)) for word in config.skiplist_words)
        model.eval().to(device)
        self._layers = [(w.to(device=device, dtype=torch_dtype), None if b is None else b.to(device, torch_dtype))
                        for w, b in layers]
        self.config, self._tokenizer, self._model, self._device = config, tokenizer, model, torch.device(device)
        if opts.torch_compile:
            log.info("torch multi-vector backend: torch_compile is not applied to ColBERT models (eager forwards)")
        log.info("torch multi-vector backend: %s on %s (%s), %d-dim token vectors, query %d / document %d tokens",
                 opts.model_label, device, dtype_name, config.dimension, config.query_length, config.document_length)
        self._positions = opts.facts.length_limit(opts.max_model_len)
        return BackendInfo(
            model=opts.model_label, device=device, dtype=dtype_name, dimension=config.dimension,
            max_model_len=self._positions,
            vocab_size=tokenizer.vocab_size,
            special_prefix=tokenizer.special_prefix, special_suffix=tokenizer.special_suffix,
            prompts=opts.facts.prompts, default_prompt_name=opts.facts.default_prompt_name,
            padded=True, max_concurrent_batches=1, engine="torch", task="multivector")

    def _marker_id(self, tokenizer: Any, prefix: str) -> int | None:
        """The id of a [Q]/[D] marker. PyLate adds a missing one to the vocabulary with a new random embedding
        row: a folder without its markers cannot give PyLate's vectors, so it is refused."""
        if not prefix:
            return None
        found = tokenizer.convert_tokens_to_ids(prefix)
        if found is None or found == tokenizer.unk_token_id:
            raise BackendLoadError(f"{self._options.model_dir}: the marker {prefix!r} is not in the tokenizer's "
                                   "vocabulary (PyLate would add it with a random embedding); save the model "
                                   "with PyLate first")
        return int(found)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        assert self._tokenizer is not None, "load() first"
        return self._tokenizer(texts)

    def side_limit(self, query: bool) -> int:
        """The most tokens a text may have (special tokens included) before its marker goes in: the side's
        length, within the model's positions (both less the marker)."""
        length = min(self.config.query_length if query else self.config.document_length, self._positions)
        return length - 1 if self._markers[0 if query else 1] is not None else length

    def mark(self, seq: Sequence[int], query: bool) -> list[int]:
        """PyLate's tokenize: the marker after the first token; a query expanded to query_length."""
        marker = self._markers[0 if query else 1]
        out = list(seq) if marker is None else [*seq[:1], marker, *seq[1:]]
        if query and self.config.do_query_expansion:
            out += [self._expansion_id] * (self.config.query_length - len(out))
        return out

    def _attended(self, seq: Sequence[int]) -> int:
        """How many leading tokens are attended to: up to the closing special token, unless expanded tokens
        are attended too (a document ends at its closing token: all of it)."""
        if self._closing is None or self.config.attend_to_expansion_tokens:
            return len(seq)
        for index in range(len(seq) - 1, -1, -1):
            if seq[index] == self._closing:
                return index + 1
        return len(seq)

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        import torch

        assert self._model is not None and self._tokenizer is not None, "load() first"
        rows = len(batch)
        ids, mask = padded_batch(batch, self._tokenizer.pad_id, [self._attended(seq) for seq in batch])
        with torch.inference_mode():
            states = self._model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device))[0]
            for weight, bias in self._layers:
                states = torch.nn.functional.linear(states, weight, bias)
            vectors = torch.nn.functional.normalize(states.float(), p=2, dim=-1).cpu().numpy()
        out = np.empty((rows, 1), dtype=object)
        for row, seq in enumerate(batch):
            out[row, 0] = vectors[row, : len(seq)]
        return out

    def close(self) -> None:
        self._model = None
        self._layers = []
        self._tokenizer = None
