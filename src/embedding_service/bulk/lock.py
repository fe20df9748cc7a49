"""One writer per output: an flock(2) on `<output>.partial/lock`, held from before the input scan to the end.

The kernel drops the lock when its holder dies (kill -9 too), so a stale work folder needs no clean-up: the next
run takes the lock and resumes. The lock file records who holds it (pid, host, start time) for the refusal line.

The folder is removed by its holder at the end, lock file last and while still locked. A run that opened the old
lock file just before may then get a lock on an unlinked inode; it notices (the path's inode differs) and tries
again, so two runs never both believe they hold the output.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

import orjson

__all__ = ["OutputBusy", "WorkLock"]

LOCK_NAME = "lock"
_TRIES = 20  # each retry means the folder was removed under us by a run that just finished: a few suffice


class OutputBusy(RuntimeError):
    """Another live run holds the output's lock."""


class WorkLock:
    """The held lock; `release()` (or `remove()`, once the output is written) ends it."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder, self._fd = folder, fd

    @classmethod
    def acquire(cls, folder: Path, output: Path) -> WorkLock:
        for _ in range(_TRIES):
            folder.mkdir(exist_ok=True)
            path = folder / LOCK_NAME
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                continue  # the folder was removed between mkdir and open
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise OutputBusy(f"{output} is being written by another run ({owner}); wait for it to end, or "
                                 "stop it and run this again to resume its work") from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, path):
                lock = cls(folder, fd)
                try:
                    _write_owner(fd)
                except BaseException:
                    lock._close()
                    raise
                return lock
            os.close(fd)  # locked a lock file its holder had just removed: start over on the new one
        raise OutputBusy(f"{output}: could not lock {folder} (it keeps being removed and created by other runs)")

    def clear(self) -> None:
        """Remove everything in the folder but the lock (--overwrite, a fresh start)."""
        for entry in self.folder.iterdir():
            if entry.name == LOCK_NAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def remove(self) -> None:
        """The job is done: remove the folder, the lock file last, then let go."""
        try:
            self.clear()
            (self.folder / LOCK_NAME).unlink()
            with contextlib.suppress(OSError):  # ENOTEMPTY: a new run already locked a fresh file in it
                self.folder.rmdir()
        finally:
            self._close()

    def release(self) -> None:
        """Let go, keeping the folder's work for a rerun; a folder holding nothing but the lock is removed."""
        if self._fd < 0:
            return  # removed with the folder already
        try:
            work_left = any(e.name != LOCK_NAME for e in self.folder.iterdir())
        except OSError:  # the folder was removed by hand: nothing to keep
            work_left = True
        if work_left:
            self._close()
        else:
            self.remove()

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            # Unlock explicitly: a process forked meanwhile (an engine's worker) shares the open file.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _write_owner(fd: int) -> None:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    body = orjson.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
    os.ftruncate(fd, 0)
    os.pwrite(fd, body + b"\n", 0)


def _read_owner(fd: int) -> str:
    # The holder writes its record right after locking: an empty file means it is just starting.
    for _ in range(10):
        try:
            data = orjson.loads(os.pread(fd, 4096, 0))
            return f"pid {data['pid']} on {data['host']}, started {data['started']}"
        except (orjson.JSONDecodeError, KeyError, TypeError, OSError):
            time.sleep(0.02)
    return "its pid is not recorded yet"
