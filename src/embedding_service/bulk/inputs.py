"""The input files of a bulk job: files, folders and globs resolved to readable files of known formats."""

from __future__ import annotations

import glob as globlib
import os
from pathlib import Path

__all__ = ["FORMATS", "BulkInputError", "expand_inputs"]

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class BulkInputError(ValueError):
    """An input the job cannot use; the message is one line naming the file (and row)."""


def expand_inputs(items: list[str]) -> list[Path]:
    """Files, folders (their files of known formats, sorted) and globs (sorted), in the order given."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
            if not found:
                raise BulkInputError(f"folder {path} holds no {'/'.join(sorted(set(FORMATS.values())))} files")
            out.extend(found)
        elif path.exists():
            out.append(path)
        elif globlib.has_magic(item):
            matched = sorted(Path(p) for p in globlib.glob(item, recursive=True) if Path(p).is_file())
            if not matched:
                raise BulkInputError(f"no files match {item}")
            out.extend(matched)
        else:
            raise BulkInputError(f"input {path} does not exist")
    resolved = [p.resolve() for p in out]
    for path in resolved:
        if path.suffix.lower() not in FORMATS:
            raise BulkInputError(f"{path}: unknown input format {path.suffix or '(no suffix)'}; "
                                 "use .txt, .jsonl, .csv or .parquet")
        if not os.access(path, os.R_OK):
            raise BulkInputError(f"{path}: not readable")
    return resolved
