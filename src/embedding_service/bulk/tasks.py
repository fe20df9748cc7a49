"""What a bulk chunk becomes for each task of the model in this process: dense vectors (a float32 matrix),
sparse ones (SPLADE: parquet `list<struct<index: int32, value: float32>>`, the non-zeros by index) or token
vectors (ColBERT: parquet `list<list<float32>>`, one vector per kept token).

Each task prepares a chunk's texts as its online endpoint does (prompts, query/document side, length policy)
and runs the batches bulk plans; the runner writes what `assemble` returns as the part's `embedding` column.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ..engine.core import EngineCore
from ..engine.engine import EmbeddingEngine
from ..engine.multivector import MultiVectorEngine
from ..engine.sparse import SparseEngine, SparseVector
from ..engine.types import EMBED

__all__ = ["BULK_SIDES", "SPARSE_TYPE", "TOKEN_VECTORS_TYPE", "ChunkTask", "check_options", "chunk_task",
           "sparse_column", "token_vectors_column"]

SPARSE_TYPE = pa.list_(pa.struct([("index", pa.int32()), ("value", pa.float32())]))
TOKEN_VECTORS_TYPE = pa.list_(pa.list_(pa.float32()))
BULK_SIDES = {"search_query": "query", "search_document": "document"}  # --input-type, as the online input_type


class ChunkTask:
    """A dense model's chunk: prompts or instruction, Matryoshka dimensions, a float32 matrix."""

    shaped = False  # a float32 matrix (npy and the int8/binary vector types apply), not a nested column

    def __init__(self, engine: EngineCore, instruction: str | None, prompt_name: str | None,
                 dimensions: int | None) -> None:
        self.engine = engine
        self.instruction, self.prompt_name, self.dimensions = instruction, prompt_name, dimensions

    def prepare(self, texts: list[str]) -> list[list[int]]:
        assert isinstance(self.engine, EmbeddingEngine)
        return self.engine.prepare(texts, instruction=self.instruction, prompt_name=self.prompt_name)

    def run(self, seqs: list[list[int]]) -> Any:
        assert isinstance(self.engine, EmbeddingEngine)
        return self.engine.embed_batch(seqs, self.dimensions)

    def assemble(self, count: int, batches: Sequence[list[int]], results: Sequence[Any]) -> np.ndarray | pa.Array:
        if not results:  # (a chunk whose rows were all skipped)
            info = self.engine.info
            return np.zeros((0, self.dimensions or (info.dimension if info is not None else 0)), np.float32)
        out = np.empty((count, results[0].shape[1]), dtype=np.float32)
        for batch, vectors in zip(batches, results, strict=True):
            out[batch] = vectors
        return out


class _RowsTask(ChunkTask):
    """A task whose batches give one object per text (a SparseVector, a token matrix), written as a column by
    `column`: its engine's synchronous prepare / encode_batch, with the side bound."""

    shaped = True

    def __init__(self, engine: EngineCore, prepare: Callable[[list[str]], list[list[int]]],
                 run: Callable[[list[list[int]]], list[Any]], column: Callable[[list[Any]], pa.Array]) -> None:
        super().__init__(engine, None, None, None)
        self._prepare, self._run, self._column = prepare, run, column

    def prepare(self, texts: list[str]) -> list[list[int]]:
        return self._prepare(texts)

    def run(self, seqs: list[list[int]]) -> Any:
        return self._run(seqs)

    def assemble(self, count: int, batches: Sequence[list[int]], results: Sequence[Any]) -> np.ndarray | pa.Array:
        rows: list[Any] = [None] * count
        for batch, batch_rows in zip(batches, results, strict=True):
            for index, row in zip(batch, batch_rows, strict=True):
                rows[index] = row
        return self._column(rows)


def check_options(task: str, *, instruction: str | None = None, prompt_name: str | None = None,
                  dimensions: int | None = None, input_type: str | None = None) -> None:
    """Refuse (ValueError) the options that do not apply to a model of `task`, before it loads."""
    if task == EMBED:
        if input_type is not None:
            raise ValueError("--input-type selects the query or document side of a sparse or multi-vector model; "
                             "for an embedding model use --prompt-name or --instruction")
        return
    for flag, value in (("--instruction", instruction), ("--prompt-name", prompt_name),
                        ("--dimensions", dimensions)):
        if value is not None:
            raise ValueError(f"{flag} applies to embedding models; this model's task is {task} (use "
                             "--input-type search_query / search_document for its side)")


def chunk_task(engine: EngineCore, *, instruction: str | None = None, prompt_name: str | None = None,
               dimensions: int | None = None, input_type: str | None = None) -> ChunkTask:
    """The chunk task of the loaded engine (its options checked by check_options)."""
    check_options(engine.task, instruction=instruction, prompt_name=prompt_name, dimensions=dimensions,
                  input_type=input_type)
    side = BULK_SIDES[input_type] if input_type is not None else None
    if isinstance(engine, EmbeddingEngine):
        return ChunkTask(engine, instruction, prompt_name, dimensions)
    if isinstance(engine, SparseEngine):
        return _RowsTask(engine, functools.partial(engine.prepare, side=side),
                         functools.partial(engine.encode_batch, side=side), sparse_column)
    if isinstance(engine, MultiVectorEngine):  # no side: a query, as PyLate's encode and the online API default
        query = side != "document"
        return _RowsTask(engine, functools.partial(engine.prepare, query=query),
                         functools.partial(engine.encode_batch, query=query), token_vectors_column)
    raise ValueError(f"model '{engine.name}' ({engine.task}) has no vectors to write in bulk")


def sparse_column(vectors: Sequence[SparseVector]) -> pa.Array:
    """SPLADE vectors as `list<struct<index: int32, value: float32>>` (each list sorted by index)."""
    offsets = np.zeros(len(vectors) + 1, dtype=np.int32)
    np.cumsum([len(v.indices) for v in vectors], out=offsets[1:])
    indices = np.concatenate([v.indices for v in vectors]).astype(np.int32) if vectors else np.zeros(0, np.int32)
    values = np.concatenate([v.values for v in vectors]).astype(np.float32) if vectors else np.zeros(0, np.float32)
    pairs = pa.StructArray.from_arrays([pa.array(indices), pa.array(values)], names=["index", "value"])
    return pa.ListArray.from_arrays(pa.array(offsets), pairs, type=SPARSE_TYPE)


def token_vectors_column(matrices: Sequence[np.ndarray]) -> pa.Array:
    """(tokens, dim) float32 matrices as `list<list<float32>>`: a list of token vectors per text."""
    dim = matrices[0].shape[1] if matrices else 0
    token_offsets = np.zeros(len(matrices) + 1, dtype=np.int32)
    np.cumsum([len(m) for m in matrices], out=token_offsets[1:])
    tokens = int(token_offsets[-1])
    flat = (np.concatenate([np.asarray(m, np.float32).reshape(-1) for m in matrices]) if matrices
            else np.zeros(0, np.float32))
    vectors = pa.ListArray.from_arrays(pa.array(np.arange(tokens + 1, dtype=np.int32) * dim),
                                       pa.array(flat, pa.float32()))
    return pa.ListArray.from_arrays(pa.array(token_offsets), vectors, type=TOKEN_VECTORS_TYPE)
