"""The transformers/torch backend: AutoModel + sentence-transformers pooling, run under inference_mode."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import BackendInfo, BackendLoadError, BackendOptions
from .device import resolve_cpu_dtype
from .pooling import SentenceTransformersConfig, pool, read_st_config
from .tokenization import special_tokens_added

__all__ = ["TorchBackend", "special_tokens_added"]

log = logging.getLogger("embedding_service")


class TorchBackend:
    """Runs any Hugging Face encoder or decoder embedding model with plain PyTorch."""

    def __init__(self, options: BackendOptions) -> None:
        self._model_dir = options.model_dir
        self._requested_device = options.device
        self._requested_dtype = options.dtype
        self._max_model_len = options.max_model_len
        self._matryoshka = options.matryoshka
        self._label = options.model_label
        self._model: Any = None
        self._tokenizer: Any = None
        self._st: SentenceTransformersConfig | None = None
        self._device: Any = None
        self._pad_id = 0
        self._left_pad = False

    def load(self) -> BackendInfo:
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        device = self._requested_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendLoadError("device 'cuda' was requested but torch sees no CUDA GPU (use --device cpu)")
        dtype_name = resolve_cpu_dtype(self._requested_dtype) if device == "cpu" else self._requested_dtype
        torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
        if device == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(len(os.sched_getaffinity(0)) or 1)  # the cores this process may use
        try:
            config = AutoConfig.from_pretrained(self._model_dir)
            tokenizer = AutoTokenizer.from_pretrained(self._model_dir)
            model = AutoModel.from_pretrained(self._model_dir, dtype=torch_dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise BackendLoadError(f"cannot load model from {self._model_dir}: {exc}") from exc
        model.eval().to(device)
        model_type = getattr(config, "model_type", None)
        self._st = read_st_config(self._model_dir, model_type)
        self._left_pad = self._st.pooling == "last"
        tokenizer.padding_side = "left" if self._left_pad else "right"
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self._tokenizer, self._model, self._device = tokenizer, model, torch.device(device)
        prefix, suffix = special_tokens_added(tokenizer)
        hidden = int(getattr(config, "hidden_size", 0) or self.embed([[*prefix, 0, *suffix]]).shape[1])
        limit = self._st.length_limit(getattr(config, "max_position_embeddings", None)) or self._max_model_len
        info = BackendInfo(
            model=self._label,
            device=device,
            dtype=dtype_name,
            dimension=hidden,
            max_model_len=min(self._max_model_len, limit),
            vocab_size=len(tokenizer),
            special_prefix=prefix,
            special_suffix=suffix,
            matryoshka=self._matryoshka or model_type == "qwen3",
            prompts=self._st.prompts,
            default_prompt_name=self._st.default_prompt_name,
            padded=True,
            max_concurrent_batches=1,
            engine="torch",
        )
        log.info("torch backend: %s on %s (%s), pooling=%s, dim=%d", self._label, device, dtype_name,
                 self._st.pooling, hidden)
        return info

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        encoded = self._tokenizer(list(texts), add_special_tokens=True, truncation=False, padding=False,
                                  return_attention_mask=False, return_token_type_ids=False, verbose=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        import torch

        assert self._st is not None, "load() first"
        longest = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, seq in enumerate(batch):
            if self._left_pad:
                ids[row, longest - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
                mask[row, longest - len(seq):] = 1
            else:
                ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
                mask[row, : len(seq)] = 1
        with torch.inference_mode():
            ids, mask = ids.to(self._device), mask.to(self._device)
            hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = pool(self._st.pooling, hidden, mask).float()
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.cpu().numpy().astype(np.float32, copy=False)

    def close(self) -> None:
        self._model = None
        self._tokenizer = None

