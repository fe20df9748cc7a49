"""Logging: a per-request id on every record, and a text or JSON line format.

The request id lives in a context variable that the request middleware sets; asyncio copies the context
into every task and `run_in_executor` call started while handling the request, so the engine's own lines
("Processing 32 texts for embedding") carry the id too. Records outside a request show "-".

Lines logged on a running event loop below WARNING go out together, one write per loop iteration
(`LoopBatchedStreamHandler`): under load a write to the log cost ~6 µs of the event loop's CPU, and the server
writes two lines per request (bench/RESULTS.md, session 27).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import Literal

import orjson

__all__ = [
    "JsonFormatter",
    "LogFormat",
    "LoopBatchedStreamHandler",
    "RequestIdFilter",
    "TextFormatter",
    "configure_logging",
    "request_id_var",
]

LogFormat = Literal["text", "json"]

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"

# Attributes every LogRecord has; anything else was passed with `extra=` and goes into the JSON line.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (or "-") so that formats can name it. Installed on handlers, not loggers,
    so that records of every logger (uvicorn's included) get it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get() or "-"
        return True


# Control characters (C0, DEL, C1) and Unicode line breaks: in a message they could forge or hide lines.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


class TextFormatter(logging.Formatter):
    """The text format, with control characters in messages escaped (`\\n`, `\\x00`): a client's path or
    header that reaches a log line cannot start a line of its own. Tracebacks keep their line breaks."""

    _stamp: tuple[int, str] = (-1, "")  # (second, its local-time text): strftime once a second, not per line

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if self._stamp[0] != second:
            self._stamp = (second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second)))
        return f"{self._stamp[1]},{int(record.msecs):03d}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        if _UNSAFE.search(record.message):
            record.message = _UNSAFE.sub(_escape, record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (Loki, Elasticsearch, CloudWatch...)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id and request_id != "-":
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key != "request_id" and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


class LoopBatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose INFO and DEBUG lines from a running event loop are written once per iteration.

    Such a line is formatted at once and kept; a callback that the loop runs after its current batch of
    ready callbacks writes every kept line in one write. Lines from other threads, WARNING and above, and
    `flush()` (logging calls it at exit) write at once, after whatever is kept, so lines keep the order of
    their calls. A process killed outright loses at most one loop iteration's lines (well under a ms).
    """

    def __init__(self, stream: object = None) -> None:
        super().__init__(stream)  # type: ignore[arg-type]
        self._kept: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held (Handler.handle)
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        loop = None
        if record.levelno < logging.WARNING:
            with contextlib.suppress(RuntimeError):  # no loop runs in this thread
                loop = asyncio.get_running_loop()
        self._kept.append(line)
        if loop is None:
            self.flush()  # now, with whatever the loop still keeps before it (the lock is reentrant)
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._scheduled = False
            if self._kept:
                data = "".join(self._kept)
                self._kept.clear()
                self._write(data)
            else:
                super().flush()

    def _write(self, data: str) -> None:
        try:
            self.stream.write(data)
            self.stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": data.rstrip()}))


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Replace the root handlers with one stderr handler in the chosen format, with request ids."""
    handler = LoopBatchedStreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("embedding_service").setLevel(level)
