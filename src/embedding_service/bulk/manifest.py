"""The work folder of a bulk job: `<output>.partial/` with `manifest.json` and one parquet part per chunk.

Every file appears atomically (written beside, fsynced, renamed), so a kill at any moment leaves either the old
or the new version. The manifest records the job's fingerprint (model, settings, inputs) and the parts done,
in order; a part on disk but not in the manifest (killed between the two renames) is simply redone. A rerun with
a different fingerprint is refused: vectors of two settings are never mixed in one output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .faults import fault_point

__all__ = ["FingerprintMismatch", "Manifest", "PartRecord", "atomic_write", "describe_mismatch", "work_dir"]

VERSION = 1


class FingerprintMismatch(ValueError):
    """The output path holds (part of) a job with other settings."""


@dataclass
class PartRecord:
    rows_in: int  # input rows of the chunk, skipped ones included
    rows_out: int  # vectors written
    tokens: int
    bytes: int


@dataclass
class Manifest:
    fingerprint: dict[str, Any]
    parts: list[PartRecord] = field(default_factory=list)
    dimension: int | None = None
    id_type: str | None = None
    version: int = VERSION

    @classmethod
    def load(cls, path: Path) -> Manifest:
        data = orjson.loads(path.read_bytes())
        if data.get("version") != VERSION:
            raise FingerprintMismatch(f"{path} is from another version of this tool; pass --overwrite")
        return cls(data["fingerprint"], [PartRecord(**p) for p in data["parts"]], data.get("dimension"),
                   data.get("id_type"))

    def save(self, path: Path) -> None:
        body = {"version": self.version, "fingerprint": self.fingerprint, "dimension": self.dimension,
                "id_type": self.id_type, "parts": [vars(p) for p in self.parts]}
        atomic_write(path, orjson.dumps(body, option=orjson.OPT_INDENT_2), fault="manifest")

    def valid_parts(self, folder: Path) -> int:
        """How many leading parts are on disk, whole (the rest are redone)."""
        for number, part in enumerate(self.parts):
            path = folder / part_name(number)
            if not path.is_file() or path.stat().st_size != part.bytes:
                return number
        return len(self.parts)


def work_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def part_name(number: int) -> str:
    return f"part-{number:06d}.parquet"


def describe_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str:
    """`model: A -> B; dtype: x -> y`, shortened to fit one line."""
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            before, after = _short(old.get(key)), _short(new.get(key))
            changes.append(f"{key}: {before} -> {after}")
    return "; ".join(changes[:4]) + ("; ..." if len(changes) > 4 else "")


def _short(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def atomic_write(path: Path, data: bytes, *, fault: str | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        half = len(data) // 2
        f.write(data[:half])
        if fault:
            f.flush()
            fault_point(f"{fault}-mid-write")  # tests: killed with half a file written
        f.write(data[half:])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if fault:
        fault_point(f"{fault}-renamed")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
