"""Bulk embedding with the model in this process: the engine `serve` would build, fed deterministic batches.

A chunk is tokenised (with the prompt / instruction rules of the server), sorted by length and cut into batches
by max_batch_size and max_batch_tokens, exactly as a function of the chunk's texts: so the same chunk gives the
same bits whether it runs first, after a resume, or in a Ray actor. Tokenising the next chunk overlaps the
model running this one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..config import EmbeddingConfig
from ..engine.batcher import batch_cost
from ..engine.core import EngineCore
from ..engine.engine import EmbeddingEngine
from ..engine.types import MULTIVECTOR, SPARSE
from ..errors import ServiceError
from ..service import ModelPlan, build_engine, plan_model
from .tasks import ChunkTask, check_options, chunk_task

__all__ = ["BulkRowError", "EmbedOptions", "LocalEmbedder", "embed_texts", "local_fingerprint", "plan_batches"]


class BulkRowError(ValueError):
    """Input `index` of a chunk was refused; `message` says why."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.message = message


@dataclass(frozen=True)
class EmbedOptions:
    instruction: str | None = None
    prompt_name: str | None = None
    dimensions: int | None = None
    input_type: str | None = None  # search_query / search_document: a sparse or multi-vector model's side


def local_fingerprint(settings: EmbeddingConfig, model: ModelPlan, options: EmbedOptions) -> dict[str, Any]:
    """What the vectors depend on, computed without loading the model (so a refusal is instant)."""
    return {"mode": "in-process", "model": settings.public_model_name, "model_dir": model.model_dir or None,
            "engine": model.engine, "dtype": settings.dtype, "device": settings.device,
            "max_model_len": settings.max_model_len, "truncate": settings.truncate,
            "max_batch_size": settings.max_batch_size, "max_batch_tokens": settings.max_batch_tokens,
            "instruction": options.instruction, "prompt_name": options.prompt_name,
            "dimensions": options.dimensions,
            # (only where they apply: an unfinished dense run from before them still resumes)
            **({"task": model.role} if model.role in (SPARSE, MULTIVECTOR) else {}),
            **({"input_type": options.input_type} if options.input_type is not None else {})}


def plan_batches(lengths: list[int], *, max_batch_size: int, max_batch_tokens: int, padded: bool) -> list[list[int]]:
    """Indices in batches: longest first (ties by position), each within the size and token budgets."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index in order:
        length = lengths[index]
        longest = lengths[current[0]] if current else length  # (sorted: a batch's first is its longest)
        if current and (len(current) >= max_batch_size or
                        batch_cost(len(current) + 1, longest, total + length, padded=padded) > max_batch_tokens):
            batches.append(current)
            current, total = [], 0
        current.append(index)
        total += length
    if current:
        batches.append(current)
    return batches


def prepare_chunk(task: ChunkTask, texts: list[str]) -> list[list[int]]:
    """Token ids for every text; a refused text raises BulkRowError naming its index."""
    try:
        return task.prepare(texts)
    except ServiceError:
        # Rare path: find which text (the engine's message names its position in the whole list).
        for index, text in enumerate(texts):
            try:
                task.prepare([text])
            except ServiceError as exc:
                raise BulkRowError(index, exc.message.replace("input[0] ", "")) from None
        raise


def batch_budget(engine: EngineCore) -> tuple[int, int, bool]:
    """(most texts, most tokens, padded) of one bulk batch: the server's budgets (the engine's BatchPolicy),
    except that a packed engine (vLLM) is bounded by tokens alone. Bulk rows have no latency to protect, and
    vLLM schedules what it is given itself without padding: batches of hundreds of short texts instead of
    max_batch_size (32) measured 1.07x `LLM.embed` instead of 0.93x (bench/RESULTS.md)."""
    engine.check_ready()
    policy = engine.batch_policy
    assert policy is not None
    size = policy.max_batch_size if policy.padded else max(policy.max_batch_size, policy.max_batch_tokens)
    return size, policy.max_batch_tokens, policy.padded


def chunk_batches(engine: EngineCore, seqs: list[list[int]]) -> list[list[int]]:
    size, tokens, padded = batch_budget(engine)
    return plan_batches([len(s) for s in seqs], max_batch_size=size, max_batch_tokens=tokens, padded=padded)


def embed_texts(engine: EmbeddingEngine, texts: list[str], options: EmbedOptions) -> tuple[np.ndarray, list[int]]:
    """One chunk, synchronously (the Ray actors' path): vectors in input order and each text's tokens."""
    task = chunk_task(engine, instruction=options.instruction, prompt_name=options.prompt_name,
                      dimensions=options.dimensions)
    seqs = prepare_chunk(task, texts)
    batches = chunk_batches(engine, seqs)
    vectors = task.assemble(len(seqs), batches, [task.run([seqs[i] for i in batch]) for batch in batches])
    assert isinstance(vectors, np.ndarray)  # (a dense model's)
    return vectors, [len(s) for s in seqs]


class LocalEmbedder:
    """The async face the runner uses; tokenising (one thread) overlaps the model (its own threads). The model
    may be an embedding, sparse or multi-vector one (bulk/tasks.py: what each writes)."""

    pipeline_depth = 2  # chunks in flight: one being tokenised while one runs

    def __init__(self, settings: EmbeddingConfig, options: EmbedOptions, *, task: str | None = None) -> None:
        self.settings = settings
        self.options = options
        # The model folder, its task (the folder's unless told) and engine, decided once (service.py).
        self.plan = plan_model(settings, task)
        check_options(self.plan.role, instruction=options.instruction, prompt_name=options.prompt_name,
                      dimensions=options.dimensions, input_type=options.input_type)
        self.engine: EngineCore | None = None
        self.task: ChunkTask | None = None
        self._tokenizer = ThreadPoolExecutor(1, thread_name_prefix="bulk-tokenize")
        self._compute: ThreadPoolExecutor | None = None

    def fingerprint(self) -> dict[str, Any]:
        return local_fingerprint(self.settings, self.plan, self.options)

    @property
    def shaped(self) -> bool:
        """Whether the vectors are a nested column (sparse, token vectors) rather than a float32 matrix."""
        return self.plan.role in (SPARSE, MULTIVECTOR)

    @property
    def dimension(self) -> int | None:
        if self.engine is None or self.engine.info is None:
            return None
        return self.options.dimensions or self.engine.info.dimension

    async def start(self) -> None:
        self.engine = build_engine(self.plan)
        await self.engine.start()
        assert self.engine.info is not None
        self.task = chunk_task(self.engine, instruction=self.options.instruction,
                               prompt_name=self.options.prompt_name, dimensions=self.options.dimensions,
                               input_type=self.options.input_type)
        self._compute = ThreadPoolExecutor(self.engine.info.max_concurrent_batches, thread_name_prefix="bulk-embed")

    async def embed(self, texts: list[str], on_progress: Callable[[int], None]) -> tuple[np.ndarray | pa.Array, int]:
        engine, task, compute = self.engine, self.task, self._compute
        assert engine is not None and task is not None and compute is not None
        loop = asyncio.get_running_loop()
        seqs = await loop.run_in_executor(self._tokenizer, prepare_chunk, task, texts)
        batches = chunk_batches(engine, seqs)

        async def run(batch: list[int]) -> Any:
            vectors = await loop.run_in_executor(compute, task.run, [seqs[i] for i in batch])
            on_progress(len(batch))
            return vectors

        results = await asyncio.gather(*(run(b) for b in batches))
        return task.assemble(len(seqs), batches, results), sum(len(s) for s in seqs)

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
        self._tokenizer.shutdown(wait=False, cancel_futures=True)
        if self._compute is not None:
            self._compute.shutdown(wait=False, cancel_futures=True)
