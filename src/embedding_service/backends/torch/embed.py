"""The transformers/torch backend: AutoModel + sentence-transformers pooling, run under inference_mode.

With `torch_compile` the model is compiled once (dynamic shapes) and, on CUDA, each batch shape's forward is
recorded as a CUDA graph and replayed: an eager forward of a 0.6B model issues ~1,600 kernels, and a GPU
spends most of a small batch waiting for the CPU to launch them (bench/RESULTS.md, session 33). Batches are
padded to a few bucket shapes so that few graphs are recorded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..base import TRANSFORMERS_BUILD, BackendInfo, BackendLoadError, BackendOptions
from ..model.pooling import pool
from ..model.tokenization import HfTokenizer, TokenizerHolder
from ..runtime.device import resolve_cpu_dtype
from ..runtime.length_groups import embed_in_groups

__all__ = ["TorchBackend", "bucket", "torch_placement"]

log = logging.getLogger("embedding_service")


class TorchBackend(TokenizerHolder):
    """Runs any Hugging Face encoder or decoder embedding model with plain PyTorch."""

    def __init__(self, options: BackendOptions) -> None:
        self._options = options
        self._model_dir = options.model_dir
        self._pooling = options.facts.pooling
        self._model: Any = None
        self._tokenizer: HfTokenizer | None = None
        self._device: Any = None
        self._pad_id = 0
        self._left_pad = False
        self._compiled: Any = None  # the compiled model, with torch_compile
        self._position_limit = 0  # the longest input the model's positions take: padding stays within it

    def load(self) -> BackendInfo:
        import torch

        opts, facts = self._options, self._options.facts
        device, dtype_name, torch_dtype = torch_placement(opts)
        try:
            with TRANSFORMERS_BUILD:
                from transformers import AutoModel

                tokenizer = HfTokenizer(self._model_dir)
                model = AutoModel.from_pretrained(self._model_dir, dtype=torch_dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise BackendLoadError(f"cannot load model from {self._model_dir}: {exc}") from exc
        model.eval().to(device)
        self._left_pad = self._pooling == "last"
        raw = tokenizer.tokenizer
        raw.padding_side = "left" if self._left_pad else "right"
        self._pad_id = raw.pad_token_id if raw.pad_token_id is not None else (raw.eos_token_id or 0)
        self._tokenizer, self._model, self._device = tokenizer, model, torch.device(device)
        prefix, suffix = tokenizer.special_prefix, tokenizer.special_suffix
        if opts.torch_compile:
            self._compile(device, [*prefix, 0, *suffix])
        hidden = facts.hidden_size or int(self.embed([[*prefix, 0, *suffix]]).shape[1])
        info = BackendInfo.of_embedding_model(opts, tokenizer, engine="torch", device=device, dtype=dtype_name,
                                              dimension=hidden, max_model_len=facts.length_limit(opts.max_model_len))
        log.info("torch backend: %s on %s (%s), pooling=%s, dim=%d", opts.model_label, device, dtype_name,
                 self._pooling, hidden)
        return info

    def _compile(self, device: str, probe: list[int]) -> None:
        import time

        import torch

        self._position_limit = self._options.facts.length_limit(1 << 30)
        # reduce-overhead: CUDA graphs on a GPU (on a CPU it compiles without them)
        mode = "reduce-overhead" if device == "cuda" else "default"
        self._compiled = torch.compile(self._model, mode=mode, dynamic=True)
        started = time.perf_counter()
        self.embed([probe])  # compiles now, at start, not on a client's first request
        log.info("torch backend: compiled (%s) in %.1fs", mode, time.perf_counter() - started)

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        assert self._model is not None, "load() first"
        if self._device.type == "cpu" and self._compiled is None:  # (a GPU pays per launch; compiled shapes bucket)
            return embed_in_groups(batch, self._forward)  # rows of similar lengths together: less padding
        return self._forward(batch)

    def _forward(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        import torch

        rows = len(batch)
        longest = max(len(ids) for ids in batch)
        if self._compiled is not None:  # bucket shapes: copies of the first row, and more padding
            batch = [*batch, *[batch[0]] * (bucket(rows, 2) - rows)]
            longest = max(longest, min(bucket(longest, 16), self._position_limit))
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
            if self._compiled is not None:
                torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are no longer read
                hidden = self._compiled(input_ids=ids, attention_mask=mask).last_hidden_state
            else:
                hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = pool(self._pooling, hidden[:rows], mask[:rows]).float()
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.cpu().numpy().astype(np.float32, copy=False)

    def close(self) -> None:
        self._model = None
        self._compiled = None
        self._tokenizer = None


def bucket(n: int, minimum: int) -> int:
    """The bucket size for `n` (rows or tokens): the smallest of 2^k and 3 x 2^(k-2) that holds it, at least
    `minimum` (so at most a third of a padded batch is padding, and a dimension of 1, which a compiler
    specialises on, never occurs)."""
    n = max(n, minimum)
    power = 1 << (n - 1).bit_length()
    three_quarters = power * 3 // 4
    return three_quarters if power >= 4 and three_quarters >= n else power


def torch_placement(options: BackendOptions) -> tuple[str, str, Any]:
    """(device, dtype name, torch dtype) for `options` on this machine; sets torch's CPU threads.

    BackendLoadError when CUDA is asked for and torch sees none.
    """
    import torch

    device = options.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendLoadError("device 'cuda' was requested but torch sees no CUDA GPU (use --device cpu)")
    dtype_name = resolve_cpu_dtype(options.dtype) if device == "cpu" else options.dtype
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    if device == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(len(os.sched_getaffinity(0)) or 1)  # the cores this process may use
    return device, dtype_name, torch_dtype
