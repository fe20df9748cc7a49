"""Inputs of a bulk job: txt, jsonl, csv and parquet files (or a glob or a folder of them), read in chunks.

`scan()` makes a plan first (rows per file, chunk boundaries; cheap: parquet metadata, one byte scan of
txt/jsonl, one streaming parse of csv), so that the total is known for the ETA, chunks are fixed by the input
alone (a resumed run cuts the same chunks) and any chunk can be read without reading those before it.

Rows: txt one text per line, split on `\\n` only (`\\r` stays in the text); jsonl one object per line, the text
in `column`; csv and parquet a column. Ids: `id_column`, else the 0-based row position in the input (skipped
rows counted).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from ..backends.base import first_line
from .inputs import FORMATS, BulkInputError, expand_inputs

__all__ = ["FORMATS", "BulkInputError", "Chunk", "ChunkReader", "ChunkSpec", "InputFile", "Plan", "expand_inputs",
           "scan"]

_SCAN_BLOCK = 1 << 20


@dataclass(frozen=True)
class InputFile:
    path: Path
    fmt: str
    rows: int
    first_row: int  # position of its first row in the whole input
    offsets: tuple[int, ...] = ()  # txt/jsonl: byte offset of each chunk's first line, plus the file's size

    def row_name(self, row: int) -> str:
        """How an error names a row: file:line for line formats (1-based), `file row N` for tables."""
        return f"{self.path}:{row + 1}" if self.fmt in ("txt", "jsonl") else f"{self.path} row {row}"


@dataclass(frozen=True)
class ChunkSpec:
    index: int  # chunk number in the whole job
    file: int  # index into Plan.files
    start: int  # first row, within the file
    stop: int


@dataclass
class Chunk:
    spec: ChunkSpec
    texts: list[str]
    ids: pa.Array
    rows: list[int] = field(default_factory=list)  # file row of each kept text (for error messages)

    @property
    def skipped(self) -> int:
        return self.spec.stop - self.spec.start - len(self.texts)


@dataclass(frozen=True)
class Plan:
    files: tuple[InputFile, ...]
    chunks: tuple[ChunkSpec, ...]
    column: str
    id_column: str | None
    skip_empty: bool
    chunk_rows: int

    @property
    def total_rows(self) -> int:
        return sum(f.rows for f in self.files)

    def fingerprint(self) -> dict[str, Any]:
        """What the output depends on, on the input side (a changed file refuses a resume)."""
        files = []
        for f in self.files:
            stat = f.path.stat()
            files.append([str(f.path), stat.st_size, stat.st_mtime_ns])
        return {"inputs": files, "column": self.column, "id_column": self.id_column, "skip_empty": self.skip_empty,
                "chunk_rows": self.chunk_rows}


def scan(paths: list[Path], *, column: str = "text", id_column: str | None = None, skip_empty: bool = False,
         chunk_rows: int = 8192) -> Plan:
    files: list[InputFile] = []
    chunks: list[ChunkSpec] = []
    first = 0
    id_type: pa.DataType | None = None
    for number, path in enumerate(paths):
        fmt = FORMATS[path.suffix.lower()]
        try:
            if fmt in ("txt", "jsonl"):
                if fmt == "txt" and id_column:
                    raise BulkInputError(f"{path}: a .txt file has no columns; --id-column needs jsonl, csv or parquet")
                rows, offsets = _scan_lines(path, chunk_rows)
                info = InputFile(path, fmt, rows, first, offsets)
            elif fmt == "csv":
                info = InputFile(path, fmt, _scan_csv(path, column, id_column), first)
            else:
                rows, this_id_type = _scan_parquet(path, column, id_column)
                if id_type is not None and this_id_type is not None and this_id_type != id_type:
                    raise BulkInputError(f"{path}: id column {id_column!r} is {this_id_type}, but {id_type} in "
                                         "earlier files; ids must have one type")
                id_type = id_type or this_id_type
                info = InputFile(path, fmt, rows, first)
        except BulkInputError:
            raise
        except (OSError, pa.ArrowException) as exc:
            raise BulkInputError(f"{path}: cannot read it as {fmt}: {first_line(exc)}") from None
        files.append(info)
        for start in range(0, info.rows, chunk_rows):
            chunks.append(ChunkSpec(len(chunks), number, start, min(start + chunk_rows, info.rows)))
        first += info.rows
    return Plan(tuple(files), tuple(chunks), column, id_column, skip_empty, chunk_rows)


def _scan_lines(path: Path, chunk_rows: int) -> tuple[int, tuple[int, ...]]:
    """Rows (a last line without `\\n` counts) and the byte offset where every chunk starts."""
    offsets = [0]
    rows = 0
    position = 0
    last = b"\n"
    with path.open("rb") as f:
        while block := f.read(_SCAN_BLOCK):
            start = 0
            count = block.count(b"\n")
            # Only blocks that cross a chunk boundary are searched line by line.
            while rows + count >= len(offsets) * chunk_rows and count:
                need = len(offsets) * chunk_rows - rows  # newlines to the boundary
                for _ in range(need):
                    start = block.index(b"\n", start) + 1
                rows += need
                count -= need
                offsets.append(position + start)
            rows += count
            position += len(block)
            last = block[-1:]
    if position and last != b"\n":
        rows += 1
    if offsets[-1] >= position:
        offsets.pop()  # a boundary exactly at the end starts no chunk
    offsets.append(position)
    return rows, tuple(offsets)


def _csv_options(column: str, id_column: str | None, block_size: int = _SCAN_BLOCK) -> dict[str, Any]:
    import pyarrow.csv as pcsv

    wanted = [column] + ([id_column] if id_column else [])
    # Text and ids stay strings: no type guessing per block (an id "007" stays "007").
    convert = pcsv.ConvertOptions(include_columns=wanted, column_types={name: pa.string() for name in wanted},
                                  strings_can_be_null=False, quoted_strings_can_be_null=False)
    return {"read_options": pcsv.ReadOptions(block_size=block_size), "convert_options": convert}


def _scan_csv(path: Path, column: str, id_column: str | None) -> int:
    import pyarrow.csv as pcsv

    _check_csv_header(path, column, id_column)
    rows = 0
    with pcsv.open_csv(path, **_csv_options(column, id_column)) as reader:
        for batch in reader:
            rows += batch.num_rows
    return rows


def _check_csv_header(path: Path, column: str, id_column: str | None) -> None:
    import csv

    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        header = next(csv.reader(f), None)
    if header is None:
        raise BulkInputError(f"{path}: empty csv file (no header line)")
    for name in (column, id_column):
        if name and name not in header:
            raise BulkInputError(f"{path}: no column {name!r}; the header has {', '.join(header[:20])}")


def _scan_parquet(path: Path, column: str, id_column: str | None) -> tuple[int, pa.DataType | None]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    for name in (column, id_column):
        if name and schema.get_field_index(name) < 0:
            raise BulkInputError(f"{path}: no column {name!r}; it has {', '.join(schema.names[:20])}")
    text_type = schema.field(column).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise BulkInputError(f"{path}: column {column!r} is {text_type}, not text")
    return pf.metadata.num_rows, schema.field(id_column).type if id_column else None


class ChunkReader:
    """Reads the plan's chunks; in order it streams each file once (tables keep an open cursor)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._cursor: _TableCursor | None = None

    def read(self, spec: ChunkSpec) -> Chunk:
        info = self.plan.files[spec.file]
        try:
            if info.fmt in ("txt", "jsonl"):
                return self._read_lines(info, spec)
            return self._read_table(info, spec)
        except BulkInputError:
            raise
        except (OSError, pa.ArrowException) as exc:
            raise BulkInputError(f"{info.path}: cannot read rows {spec.start}-{spec.stop - 1}: "
                                 f"{first_line(exc)}") from None

    def close(self) -> None:
        self._cursor = None

    # --- line formats --------------------------------------------------------------------------------
    def _read_lines(self, info: InputFile, spec: ChunkSpec) -> Chunk:
        number = spec.start // self.plan.chunk_rows
        with info.path.open("rb") as f:
            f.seek(info.offsets[number])
            data = f.read(info.offsets[number + 1] - info.offsets[number])
        lines = data.split(b"\n")
        if data.endswith(b"\n"):
            lines.pop()
        if len(lines) != spec.stop - spec.start:
            raise BulkInputError(f"{info.path} changed while being read; start again with --overwrite")
        values: list[Any] = []
        ids: list[Any] | None = [] if self.plan.id_column else None
        for offset, raw in enumerate(lines):
            row = spec.start + offset
            if info.fmt == "txt":
                values.append(_decode(raw, info, row))
                continue
            obj = _json_object(raw, info, row)
            values.append(None if obj is None else obj.get(self.plan.column))
            if ids is not None:
                ids.append(_json_id(obj, self.plan.id_column or "", info, row))
        return self._chunk(info, spec, values, ids)

    # --- tables --------------------------------------------------------------------------------------
    def _read_table(self, info: InputFile, spec: ChunkSpec) -> Chunk:
        cursor = self._cursor
        if cursor is None or cursor.path != info.path or cursor.position != spec.start:
            cursor = self._cursor = _TableCursor(info, self.plan, spec.start)
        table = cursor.take(spec.stop - spec.start)
        if table.num_rows != spec.stop - spec.start:
            raise BulkInputError(f"{info.path} changed while being read; start again with --overwrite")
        texts = table.column(self.plan.column).to_pylist()
        ids = table.column(self.plan.id_column).combine_chunks() if self.plan.id_column else None
        return self._chunk(info, spec, texts, ids)

    # --- both ----------------------------------------------------------------------------------------
    def _chunk(self, info: InputFile, spec: ChunkSpec, values: list[Any], ids: Any) -> Chunk:
        keep: list[int] = []
        texts: list[str] = []
        for offset, value in enumerate(values):
            row = spec.start + offset
            if value is None or value == "":
                if self.plan.skip_empty:
                    continue
                what = "empty" if value == "" else ("missing" if info.fmt == "jsonl" else "null")
                raise BulkInputError(f"{info.row_name(row)}: text is {what} (pass --skip-empty to skip such rows)")
            if not isinstance(value, str):
                raise BulkInputError(f"{info.row_name(row)}: {self.plan.column!r} is {type(value).__name__}, "
                                     "not a string")
            keep.append(offset)
            texts.append(value)
        if ids is None:
            id_array = pa.array([info.first_row + spec.start + k for k in keep], pa.int64())
        else:
            id_array = _id_array(ids, keep, info, spec)
        return Chunk(spec, texts, id_array, [spec.start + k for k in keep])


class _TableCursor:
    """Streams record batches of one csv/parquet file from a row on; take(n) returns the next n rows."""

    def __init__(self, info: InputFile, plan: Plan, start: int) -> None:
        self.path = info.path
        self.position = start
        self._pending: list[pa.RecordBatch] = []
        self._batches = self._open(info, plan, start)

    def _open(self, info: InputFile, plan: Plan, start: int) -> Iterator[pa.RecordBatch]:
        columns = [plan.column] + ([plan.id_column] if plan.id_column else [])
        skip = start
        if info.fmt == "parquet":
            import pyarrow.parquet as pq

            # Buffered column reads, so a huge row group is streamed, not loaded whole.
            pf = pq.ParquetFile(info.path, buffer_size=1 << 20, pre_buffer=False)
            group = 0
            while group < pf.num_row_groups and skip >= pf.metadata.row_group(group).num_rows:
                skip -= pf.metadata.row_group(group).num_rows
                group += 1
            batches: Iterator[pa.RecordBatch] = pf.iter_batches(
                batch_size=min(plan.chunk_rows, 65536), row_groups=list(range(group, pf.num_row_groups)),
                columns=columns)
        else:
            import pyarrow.csv as pcsv

            batches = iter(pcsv.open_csv(info.path, **_csv_options(plan.column, plan.id_column)))
        for batch in batches:
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            yield batch.slice(skip)
            skip = 0

    def take(self, count: int) -> pa.Table:
        have = sum(b.num_rows for b in self._pending)
        while have < count:
            batch = next(self._batches, None)
            if batch is None:
                break
            self._pending.append(batch)
            have += batch.num_rows
        table = pa.Table.from_batches(self._pending) if self._pending else pa.table({})
        out, rest = table.slice(0, count), table.slice(count)
        self._pending = rest.to_batches() if rest.num_rows else []
        self.position += out.num_rows
        return out


def _decode(raw: bytes, info: InputFile, row: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BulkInputError(f"{info.row_name(row)}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _json_object(raw: bytes, info: InputFile, row: int) -> dict[str, Any] | None:
    if not raw.strip():
        return None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BulkInputError(f"{info.row_name(row)}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise BulkInputError(f"{info.row_name(row)}: a JSON {type(obj).__name__}, not an object")
    return obj


def _json_id(obj: dict[str, Any] | None, name: str, info: InputFile, row: int) -> Any:
    value = None if obj is None else obj.get(name)
    if obj is not None and value is None:
        raise BulkInputError(f"{info.row_name(row)}: id {name!r} is missing")
    if value is not None and (not isinstance(value, str | int) or isinstance(value, bool)):
        raise BulkInputError(f"{info.row_name(row)}: id {name!r} is {type(value).__name__}; ids are strings or "
                             "integers")
    return value


def _id_array(ids: Any, keep: list[int], info: InputFile, spec: ChunkSpec) -> pa.Array:
    if not isinstance(ids, pa.Array):
        kept = [ids[k] for k in keep]
        kinds = {type(v) for v in kept}
        if len(kinds) > 1:
            raise BulkInputError(f"{info.path} rows {spec.start}-{spec.stop - 1}: ids mix strings and integers")
        return pa.array(kept, pa.int64() if kinds == {int} else pa.string())
    taken = ids.take(pa.array(keep, pa.int64()))
    if taken.null_count:
        row = spec.start + keep[taken.is_null().to_pylist().index(True)]
        raise BulkInputError(f"{info.row_name(row)}: id is null")
    return taken
