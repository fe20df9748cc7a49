"""device=auto with vLLM on CUDA: if vLLM cannot load there, log why and serve with torch on the CPU.

The spec promises that without a usable GPU the service falls back to CPU mode. A CUDA build of vLLM cannot
run on the CPU, so when its load fails (no GPU visible, a broken driver, out of memory) the fallback is the
transformers/torch engine on the CPU: slower, the same vectors. Failures on a CPU build of vLLM are not
retried (torch on the same CPU would not be a different device), and an explicit `device=cuda` fails as asked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from ..base import Backend, BackendInfo, BackendLoadError

__all__ = ["CpuFallback"]

log = logging.getLogger("embedding_service")


class CpuFallback:
    """A backend that is `primary` once loaded, or what `fallback()` builds when `primary` fails on CUDA."""

    def __init__(self, primary: Backend, fallback: Callable[[], Backend]) -> None:
        self._primary = primary
        self._fallback = fallback
        self.active: Backend = primary

    def load(self) -> BackendInfo:
        try:
            return self._primary.load()
        except BackendLoadError as exc:
            if getattr(self._primary, "device_type", None) != "cuda":
                raise
            log.warning("vLLM could not load on CUDA (%s); device=auto: falling back to the torch engine on "
                        "the CPU (slower; same vectors)", exc)
        self.active = self._fallback()
        return self.active.load()

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.active.tokenize(texts)

    def embed(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        return self.active.embed(batch)

    def close(self) -> None:
        self.active.close()
