"""Outputs of a bulk job: parts (parquet, one per chunk) and the final file they are joined into.

Final formats, by the output's suffix:
- .parquet: columns `id`, `text` (with --include-text) and `embedding`, a fixed-size list of float32 (the
  layout vector databases load); one row group per chunk; the job's fingerprint in the schema metadata.
- .npy: a float32 matrix, rows in input order (vectors only).
- .jsonl: `{"id": ..., "text"?: ..., "embedding": [...]}` per line.
A sparse model's vectors (bulk/tasks.py) are `list<struct<index: int32, value: float32>>` in parquet and
`{"indices": [...], "values": [...]}` in jsonl (the /v1/embeddings shape); a multi-vector model's are a list of
token vectors (`list<list<float32>>`; jsonl: nested lists); neither fits an .npy matrix.
With --vector-type int8, uint8, binary or ubinary the final file holds those instead of float32 (parquet: a
fixed-size list of int8/uint8; npy: an int8/uint8 matrix; jsonl: integers), by vector_types.py's rules; the
parts stay float32, and each vector's bytes depend on it alone, so a resumed job equals an uninterrupted one.
The final file is written beside the output and renamed over it, so it is whole or absent. The job's
fingerprint goes with it, so that a rerun of a finished job knows it is done: in the schema metadata of a
parquet file, in an extended attribute of an npy or jsonl one (where the file system keeps them).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from ..vector_types import quantize
from .faults import fault_point
from .manifest import Manifest, atomic_write, fsync_dir, part_name

__all__ = [
    "BULK_VECTOR_TYPES",
    "METADATA_KEY",
    "OUTPUT_FORMATS",
    "count_rows",
    "finalize",
    "mark_fingerprint",
    "output_format",
    "part_table",
    "read_fingerprint",
    "write_part",
]

OUTPUT_FORMATS = {".parquet": "parquet", ".npy": "npy", ".jsonl": "jsonl"}
BULK_VECTOR_TYPES = ("float", "int8", "uint8", "binary", "ubinary")
METADATA_KEY = b"embedding_service.bulk"
XATTR_KEY = "user.embedding_service.bulk"  # the same fingerprint on npy and jsonl outputs


def output_format(path: Path) -> str:
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"output {path}: unknown format {path.suffix or '(no suffix)'}; use .parquet, .npy or .jsonl")
    return fmt


def part_table(ids: pa.Array, vectors: np.ndarray | pa.Array, texts: list[str] | None) -> pa.Table:
    """A part: ids, texts and the vectors (a float32 matrix, or the column of a sparse / multi-vector task)."""
    columns: dict[str, Any] = {"id": ids}
    if texts is not None:
        columns["text"] = pa.array(texts, pa.string())
    if isinstance(vectors, np.ndarray):
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = vectors.shape[1] if vectors.ndim == 2 else 0
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
    else:
        columns["embedding"] = vectors
    return pa.table(columns)


def write_part(folder: Path, number: int, table: pa.Table) -> int:
    """Write part `number` atomically; returns its size in bytes."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="none")  # temporary: CPU is for the model
    data = buffer.getvalue()
    atomic_write(folder / part_name(number), data, fault="part")
    return len(data)


def finalize(folder: Path, manifest: Manifest, output: Path, fmt: str, fingerprint: dict[str, Any],
             vector_type: str = "float") -> None:
    """Join the parts into `output` (atomically), as `vector_type` vectors. Memory: one part at a time."""
    tmp = folder / ("final" + output.suffix)  # inside the work folder: nothing lands beside the output
    parts = [folder / part_name(n) for n in range(len(manifest.parts))]
    if fmt == "parquet":
        _join_parquet(parts, tmp, fingerprint, vector_type)
    elif fmt == "npy":
        _join_npy(parts, tmp, sum(p.rows_out for p in manifest.parts), manifest.dimension or 0, vector_type)
    else:
        _join_jsonl(parts, tmp, vector_type)
    if fmt != "parquet":
        mark_fingerprint(tmp, fingerprint)
    os.replace(tmp, output)
    fsync_dir(output.parent)
    fault_point("final-renamed")


def mark_fingerprint(path: Path, fingerprint: dict[str, Any]) -> None:
    """Record the job's fingerprint in an extended attribute of a finished npy or jsonl file."""
    if hasattr(os, "setxattr"):
        with contextlib.suppress(OSError):  # a file system without user attributes: a rerun cannot tell
            os.setxattr(path, XATTR_KEY, orjson.dumps(fingerprint))


def read_fingerprint(output: Path) -> dict[str, Any] | None:
    """The fingerprint a finished output was written with (None when the file has none)."""
    import pyarrow.parquet as pq

    if output.suffix.lower() != ".parquet":
        try:
            return orjson.loads(os.getxattr(output, XATTR_KEY)) if hasattr(os, "getxattr") else None
        except (OSError, orjson.JSONDecodeError):
            return None
    try:
        metadata = pq.read_schema(output).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    raw = metadata.get(METADATA_KEY)
    return orjson.loads(raw) if raw else None


def count_rows(output: Path) -> int:
    """Rows of a finished output."""
    import pyarrow.parquet as pq

    suffix = output.suffix.lower()
    if suffix == ".parquet":
        return int(pq.ParquetFile(output).metadata.num_rows)
    if suffix == ".npy":
        return int(np.load(output, mmap_mode="r").shape[0])
    with output.open("rb") as lines:
        return sum(1 for _ in lines)


def _read_part(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _typed(matrix: np.ndarray, vector_type: str) -> np.ndarray:
    return matrix if vector_type == "float" else quantize(matrix, vector_type)  # type: ignore[arg-type]


def _part_typed(table: pa.Table, vector_type: str) -> pa.Table:
    """A part's table with its float32 `embedding` column as `vector_type` vectors."""
    if vector_type == "float":
        return table
    column = table.column("embedding").combine_chunks()
    matrix = column.values.to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)
    typed = _typed(matrix, vector_type)
    values = pa.array(typed.reshape(-1), pa.from_numpy_dtype(typed.dtype))
    embedding = pa.FixedSizeListArray.from_arrays(values, typed.shape[1])
    return table.set_column(table.column_names.index("embedding"), "embedding", embedding)


def _typed_dim(dim: int, vector_type: str) -> tuple[str, int]:
    """The npy dtype and width of `dim`-dimension vectors of `vector_type`."""
    if vector_type == "float":
        return "<f4", dim
    packed = vector_type in ("binary", "ubinary")
    return ("|i1" if vector_type in ("int8", "binary") else "|u1"), ((dim + 7) // 8 if packed else dim)


def _join_parquet(parts: list[Path], tmp: Path, fingerprint: dict[str, Any], vector_type: str) -> None:
    import pyarrow.parquet as pq

    writer: pq.ParquetWriter | None = None
    try:
        for number, path in enumerate(parts):
            table = _read_part(path)
            if not table.num_rows:
                continue  # a chunk whose rows were all skipped (its empty columns may lack the final types)
            table = _part_typed(table, vector_type)
            if writer is None:
                schema = table.schema.with_metadata({METADATA_KEY: orjson.dumps(fingerprint)})
                writer = pq.ParquetWriter(tmp, schema, compression="snappy")
            writer.write_table(table.cast(writer.schema))
            if number == len(parts) // 2:
                fault_point("final-mid-write")
        if writer is None:  # no rows at all: still a valid, empty file
            schema = pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32(), 0))],
                               metadata={METADATA_KEY: orjson.dumps(fingerprint)})
            writer = pq.ParquetWriter(tmp, schema)
    finally:
        if writer is not None:
            writer.close()
    _fsync(tmp)


def _join_npy(parts: list[Path], tmp: Path, rows: int, dim: int, vector_type: str) -> None:
    descr, width = _typed_dim(dim, vector_type)
    with tmp.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": (rows, width)})
        for number, path in enumerate(parts):
            column = _read_part(path).column("embedding").combine_chunks()
            matrix = np.asarray(column.values.to_numpy(zero_copy_only=False), dtype="<f4").reshape(-1, dim or 1)
            f.write(np.ascontiguousarray(_typed(matrix, vector_type), dtype=descr).tobytes())
            if number == len(parts) // 2:
                f.flush()
                fault_point("final-mid-write")
        f.flush()
        os.fsync(f.fileno())


def _join_jsonl(parts: list[Path], tmp: Path, vector_type: str) -> None:
    with tmp.open("wb") as f:
        for number, path in enumerate(parts):
            table = _read_part(path)
            ids = table.column("id").to_pylist()
            texts = table.column("text").to_pylist() if "text" in table.column_names else None
            vectors = _json_vectors(table.column("embedding").combine_chunks(), vector_type) if len(ids) else []
            for row, ident in enumerate(ids):
                item: dict[str, Any] = {"id": ident}
                if texts is not None:
                    item["text"] = texts[row]
                item["embedding"] = vectors[row]
                f.write(orjson.dumps(item, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE))
            if number == len(parts) // 2:
                f.flush()
                fault_point("final-mid-write")
        f.flush()
        os.fsync(f.fileno())


def _json_vectors(column: pa.Array, vector_type: str) -> Any:
    """A part's vectors as jsonl writes them: dense rows (a matrix), a sparse vector's {"indices", "values"}
    (the /v1/embeddings shape), or a text's list of token vectors."""
    if pa.types.is_fixed_size_list(column.type):
        return _typed(column.values.to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size), vector_type)
    if pa.types.is_struct(column.type.value_type):
        pairs = column.flatten()
        indices, values = pairs.field("index").to_numpy(), pairs.field("value").to_numpy()
        offsets = column.offsets.to_numpy() - column.offsets[0].as_py()  # (flatten starts at the first offset)
        return [{"indices": indices[a:b], "values": values[a:b]} for a, b in itertools.pairwise(offsets)]
    return column.to_pylist()


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())
