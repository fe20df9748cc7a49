"""The stored files on disk: `<data_dir>/files/<id>`, written so that a crash never leaves half a file.

An upload is written to `tmp/` as it arrives, fsynced, then renamed into `files/` (and the folder fsynced): a
file either exists whole or not at all. A batch's output grows by appends; the batch's row records the length that was
fsynced and committed, and after a crash the file is cut back to that length (`truncate`), so lines written
but not committed are written again exactly once. All methods block: call them from a thread.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path
from typing import BinaryIO

from ..bulk.manifest import fsync_dir  # (bulk/__init__ loads nothing heavy; manifest needs orjson only)

__all__ = ["Disk", "append_at", "truncate_at"]


class Disk:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = root / "files"
        self.tmp = root / "tmp"
        for folder in (root, self.files, self.tmp):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = _lock_folder(root)

    def close(self) -> None:
        os.close(self._lock)

    def path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):  # names are ours ("file-<hex>"); never a path
            raise ValueError(f"bad file name {name!r}")
        return self.files / name

    def temporary(self) -> tuple[Path, BinaryIO]:
        """A new file in tmp/ to write an upload into (then `adopt` it, or remove it)."""
        path = self.tmp / f"upload-{secrets.token_hex(8)}"
        return path, path.open("xb")

    def adopt(self, tmp: Path, out: BinaryIO, name: str) -> None:
        """Make a finished temporary file the stored file `name`: fsync, rename, fsync the folder."""
        out.flush()
        os.fsync(out.fileno())
        out.close()
        os.replace(tmp, self.path(name))
        fsync_dir(self.files)

    def append(self, name: str, data: bytes, at: int) -> int:
        """Write `data` at offset `at` (the committed length) and fsync; the new length."""
        return append_at(self.path(name), data, at)

    def truncate(self, name: str, size: int) -> None:
        """Cut an output back to its committed length (0: make it empty)."""
        truncate_at(self.path(name), size)

    def remove(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def sweep(self, keep: set[str]) -> int:
        """Delete temporaries and files nothing refers to (a crash between a write and its commit)."""
        removed = 0
        for folder, keep_names in ((self.tmp, set()), (self.files, keep)):  # (not the lock, in the root)
            for entry in folder.iterdir():
                if entry.name not in keep_names:
                    entry.unlink(missing_ok=True)
                    removed += 1
        return removed


def _lock_folder(root: Path) -> int:
    """Hold an exclusive lock on the folder for this process's life: two servers on one folder would run the
    same batches twice. The kernel drops the lock when the process ends, however it ends."""
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"data_dir {root} is in use by another server process; give each server its own "
                           "folder") from None
    return fd


def append_at(path: Path, data: bytes, at: int) -> int:
    """Write `data` at offset `at` of `path` (its committed length; anything past it is dropped: a crash after
    a write) and fsync; the new length."""
    if not data:
        return at
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, at)
        os.lseek(fd, at, os.SEEK_SET)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return at + len(data)


def truncate_at(path: Path, size: int) -> None:
    """Cut `path` back to its committed length `size` (0: make it empty; a missing file stays missing)."""
    if size == 0 and not path.exists():
        return
    with path.open("r+b") as out:
        out.truncate(size)
        os.fsync(out.fileno())
