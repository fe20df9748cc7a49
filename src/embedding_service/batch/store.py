"""The Batch API's metadata in SQLite: files and batches, each row owned by one API key.

One connection, used from one thread (`Store.call` runs every statement there), so there is one writer and
no lock contention; WAL with synchronous=FULL, so a committed progress mark survives a kill -9 (and power
loss). Every query names the owner: a row of another key is never read, listed, changed or deleted.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ACTIVE", "BatchRow", "FileRow", "Store"]

T = TypeVar("T")

# Statuses a batch still has work in (the runner picks these up again after a restart).
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT NOT NULL,
    purpose TEXT NOT NULL, filename TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, expires_at INTEGER
);
CREATE INDEX IF NOT EXISTS files_owner ON files (owner, seq);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT NOT NULL,
    endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL, completion_window TEXT NOT NULL,
    status TEXT NOT NULL, metadata TEXT, errors TEXT,
    created_at INTEGER NOT NULL, in_progress_at INTEGER, expires_at INTEGER, finalizing_at INTEGER,
    completed_at INTEGER, failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    total INTEGER NOT NULL DEFAULT 0, completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    output_file_id TEXT, error_file_id TEXT,
    -- the runner's durable progress: lines done, and the committed length of each output file
    next_line INTEGER NOT NULL DEFAULT 0, out_bytes INTEGER NOT NULL DEFAULT 0, err_bytes INTEGER NOT NULL DEFAULT 0,
    out_name TEXT NOT NULL, err_name TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_owner ON batches (owner, seq);
"""


@dataclass
class FileRow:
    seq: int
    id: str
    owner: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
    expires_at: int | None


@dataclass
class BatchRow:
    seq: int
    id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    metadata: str | None
    errors: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    total: int
    completed: int
    failed: int
    output_file_id: str | None
    error_file_id: str | None
    next_line: int
    out_bytes: int
    err_bytes: int
    out_name: str  # the output file's id, reserved at creation (its row is made when the batch ends)
    err_name: str


_FILE_COLS = ", ".join(f.name for f in fields(FileRow))
_BATCH_COLS = ", ".join(f.name for f in fields(BatchRow))


class Store:
    """Open with `Store.open(path)`; every method below runs on the store's one thread via `call`."""

    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._conn = conn
        self._executor = executor

    @classmethod
    def open(cls, path: Path) -> Store:
        executor = ThreadPoolExecutor(1, thread_name_prefix="batch-db")
        conn = executor.submit(_connect, path).result()
        return cls(conn, executor)

    def call_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """`call` for start-up, before the event loop serves anything."""
        return self._executor.submit(fn, *args).result()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.submit(self._conn.close).result()
        self._executor.shutdown()

    # --- files ----------------------------------------------------------------------------------------
    def add_file(self, row: FileRow) -> None:
        with self._conn:
            self._conn.execute(f"INSERT INTO files ({_FILE_COLS}) VALUES ({_marks(FileRow)})",
                               (None, *_values(row)[1:]))

    def file(self, owner: str, file_id: str) -> FileRow | None:
        found = self._conn.execute(f"SELECT {_FILE_COLS} FROM files WHERE owner = ? AND id = ?",
                                   (owner, file_id)).fetchone()
        return FileRow(*found) if found else None

    def files(self, owner: str, *, after: str | None, limit: int, purpose: str | None) -> list[FileRow]:
        """Newest first; `after` is the last id of the previous page."""
        query = f"SELECT {_FILE_COLS} FROM files WHERE owner = ?"
        args: list[Any] = [owner]
        if purpose is not None:
            query += " AND purpose = ?"
            args.append(purpose)
        if after is not None:
            query += " AND seq < (SELECT seq FROM files WHERE owner = ? AND id = ?)"
            args += [owner, after]
        rows = self._conn.execute(query + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [FileRow(*row) for row in rows]

    def delete_file(self, owner: str, file_id: str) -> bool:
        with self._conn:
            return self._conn.execute("DELETE FROM files WHERE owner = ? AND id = ?", (owner, file_id)).rowcount > 0

    def file_in_use(self, owner: str, file_id: str) -> str | None:
        """The id of an unfinished batch reading this file, if any."""
        found = self._conn.execute(
            f"SELECT id FROM batches WHERE owner = ? AND input_file_id = ? AND status IN ({_marks(ACTIVE)})",
            (owner, file_id, *ACTIVE)).fetchone()
        return found[0] if found else None

    def counts(self, owner: str) -> tuple[int, int]:
        """(files this key holds, unfinished batches of this key)."""
        files = self._conn.execute("SELECT COUNT(*) FROM files WHERE owner = ?", (owner,)).fetchone()[0]
        batches = self._conn.execute(f"SELECT COUNT(*) FROM batches WHERE owner = ? AND status IN ({_marks(ACTIVE)})",
                                     (owner, *ACTIVE)).fetchone()[0]
        return int(files), int(batches)

    def stored_bytes(self) -> int:
        """All files plus the outputs that unfinished batches have written so far (every key together)."""
        files = self._conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM files").fetchone()[0]
        running = self._conn.execute(f"SELECT COALESCE(SUM(out_bytes + err_bytes), 0) FROM batches "
                                     f"WHERE status IN ({_marks(ACTIVE)})", ACTIVE).fetchone()[0]
        return int(files) + int(running)

    def expired_files(self, now: int) -> list[FileRow]:
        rows = self._conn.execute(f"SELECT {_FILE_COLS} FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?",
                                  (now,)).fetchall()
        return [FileRow(*row) for row in rows]

    def known_names(self) -> set[str]:
        """Every file name on disk that must stay: stored files and the outputs of unfinished batches."""
        names = {row[0] for row in self._conn.execute("SELECT id FROM files")}
        for out_name, err_name in self._conn.execute(
                f"SELECT out_name, err_name FROM batches WHERE status IN ({_marks(ACTIVE)})", ACTIVE):
            names |= {out_name, err_name}
        return names

    # --- batches --------------------------------------------------------------------------------------
    def add_batch(self, row: BatchRow) -> None:
        with self._conn:
            self._conn.execute(f"INSERT INTO batches ({_BATCH_COLS}) VALUES ({_marks(BatchRow)})",
                               (None, *_values(row)[1:]))

    def batch(self, owner: str, batch_id: str) -> BatchRow | None:
        found = self._conn.execute(f"SELECT {_BATCH_COLS} FROM batches WHERE owner = ? AND id = ?",
                                   (owner, batch_id)).fetchone()
        return BatchRow(*found) if found else None

    def batches(self, owner: str, *, after: str | None, limit: int) -> list[BatchRow]:
        query = f"SELECT {_BATCH_COLS} FROM batches WHERE owner = ?"
        args: list[Any] = [owner]
        if after is not None:
            query += " AND seq < (SELECT seq FROM batches WHERE owner = ? AND id = ?)"
            args += [owner, after]
        rows = self._conn.execute(query + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [BatchRow(*row) for row in rows]

    def active_batches(self) -> list[BatchRow]:
        """Every key's unfinished batches, oldest first: the runner's queue."""
        rows = self._conn.execute(f"SELECT {_BATCH_COLS} FROM batches WHERE status IN ({_marks(ACTIVE)}) "
                                  "ORDER BY seq", ACTIVE).fetchall()
        return [BatchRow(*row) for row in rows]

    def update_batch(self, batch_id: str, *, only_if: tuple[str, ...] = (), **changes: Any) -> bool:
        """Set columns of one batch (by the runner, or by a route that checked the owner). With `only_if`,
        only while its status is one of those: a cancel and the runner's next step cannot overwrite each
        other. True when a row changed."""
        names = list(changes)
        query = f"UPDATE batches SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?"
        args: list[Any] = [changes[n] for n in names] + [batch_id]
        if only_if:
            query += f" AND status IN ({_marks(only_if)})"
            args += list(only_if)
        with self._conn:
            return self._conn.execute(query, args).rowcount > 0

    def finish_batch(self, batch_id: str, files: list[FileRow], **changes: Any) -> None:
        """The output file rows and the batch's final state, in one transaction."""
        names = list(changes)
        with self._conn:
            for row in files:
                self._conn.execute(f"INSERT OR IGNORE INTO files ({_FILE_COLS}) VALUES ({_marks(FileRow)})",
                                   (None, *_values(row)[1:]))
            self._conn.execute(f"UPDATE batches SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",
                               [changes[n] for n in names] + [batch_id])

    def forget_batches(self, before: int) -> int:
        """Drop finished batches made before `before` (retention)."""
        with self._conn:
            return self._conn.execute(f"DELETE FROM batches WHERE created_at < ? AND status NOT IN ({_marks(ACTIVE)})",
                                      (before, *ACTIVE)).rowcount


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False)  # (used from the store's one thread only)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.executescript(_SCHEMA)
    return conn


def _marks(cols: Any) -> str:
    count = len(fields(cols)) if isinstance(cols, type) else len(cols)
    return ", ".join("?" * count)


def _values(row: Any) -> tuple[Any, ...]:
    return tuple(getattr(row, f.name) for f in fields(row))
