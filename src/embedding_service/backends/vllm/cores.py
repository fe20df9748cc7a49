"""Two ways to drive vLLM's engine core (`vllm_engine_core`), each a small driver behind one interface (`Core`),
both fed pre-tokenised ids (text is tokenised once) and both packing a batch's sequences without padding:
- `SeparateCore` ("separate"): vLLM's async engine (`AsyncLLM`, as `vllm serve` uses) on its own event-loop
  thread, with the engine core in its own process. Several of our batches may be in flight at once; each
  sequence is one vLLM request. Best where the model runs on a GPU: the engine process schedules while our
  process serves HTTP.
- `InProcessCore` ("in-process"): vLLM's offline engine (`LLM`) with the engine core in this process, driven
  by one thread that our batcher feeds one batch at a time. Best on CPU: there the second process only
  competes for the same cores (measured on 2 cores, MiniLM, batches of 16: 268 texts/s in-process vs 193).

Several in-process engines (an embedding model and a reranker, two embedding models) take turns: vLLM keeps
its forward context (the attention metadata of the batch running) in one process-wide variable, so two
forwards from two threads read each other's metadata and the engine dies (a KeyError on a layer name). Every
in-process build, forward and shutdown holds `_IN_PROCESS_TURN`. On a CPU, where in-process is the default,
one forward already uses every core, so taking turns costs little (measured in docs/vllm.md).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import numpy as np

__all__ = ["Core", "InProcessCore", "SeparateCore"]

log = logging.getLogger("embedding_service")
T = TypeVar("T")

# Batches our batcher may have in flight at once with a separate engine core; vLLM schedules them together.
_CONCURRENT_BATCHES = 4
_MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # 0: the engine core runs in the caller's process
_SHUTDOWN_GRACE_S = 5.0  # vLLM force-kills its engine core after this; nothing there needs saving
# Held by every in-process engine while vLLM runs anything in this process (module docstring).
_IN_PROCESS_TURN = threading.Lock()


class Core(Protocol):
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


class InProcessCore:
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
            self._llm = self._thread.submit(lambda: _in_turn(LLM, **engine_args)).result()
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
        outputs = self._thread.submit(_in_turn, self._llm.encode, prompts, use_tqdm=False, pooling_task=task,
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
                thread.submit(_in_turn, _shutdown_offline, llm).result(timeout=_SHUTDOWN_GRACE_S)
            except Exception as exc:
                log.warning("vLLM shutdown raised %s: %s", type(exc).__name__, exc)
        if thread is not None:
            thread.shutdown(wait=False, cancel_futures=True)


class SeparateCore:
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


def _in_turn(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`call` while no other in-process vLLM engine runs (module docstring)."""
    with _IN_PROCESS_TURN:
        return call(*args, **kwargs)


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
