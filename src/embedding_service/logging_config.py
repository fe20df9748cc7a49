"""Logging: a per-request id on every record, and a text or JSON line format.

The request id lives in a context variable that the request middleware sets; asyncio copies the context
into every task and `run_in_executor` call started while handling the request, so the engine's own lines
("Processing 32 texts for embedding") carry the id too. Records outside a request show "-".

Lines logged on a running event loop below WARNING go out together, one write per loop iteration
(`LoopBatchedStreamHandler`): under load a write to the log cost ~6 µs of the event loop's CPU, and the server
writes two lines per request (bench/RESULTS.md, session 27).

Lines at WARNING and above are limited per call site (`RepeatLimiter`): a client can make the server warn
once per request (uvicorn warns on every malformed HTTP request, every 503 of an overload logs a line), and
a line per request from a hostile loop fills disks and costs the event loop.

Those two lines (`RequestLine`) skip the logging machinery when the set-up is this module's own text format:
through `Logger.info` each cost ~30 µs of the event loop under load (record, caller lookup, filters, format),
a quarter of the server's own work per request at 64 clients (bench/RESULTS.md, session 28).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

__all__ = [
    "JsonFormatter",
    "LogFormat",
    "LoopBatchedStreamHandler",
    "RepeatLimiter",
    "RequestIdFilter",
    "RequestLine",
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


class RepeatLimiter(logging.Filter):
    """Lets through one WARNING-or-above record per `interval_s` from each call site (logger, file, line);
    the others are counted, and the next line from that site says how many were not logged. Below WARNING
    everything passes. Installed on the handler, so uvicorn's records are limited too."""

    MAX_SITES = 4096  # call sites are few; the bound only keeps a pathological logger from growing the table

    def __init__(self, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._interval, self._clock = interval_s, clock
        self._sites: dict[tuple[str, str, int], tuple[float, int]] = {}  # site -> (next line at, not logged)
        self._lock = threading.Lock()  # handlers filter before taking their own lock

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        site, now = (record.name, record.pathname, record.lineno), self._clock()
        with self._lock:
            next_at, skipped = self._sites.get(site, (0.0, 0))
            if now < next_at:
                self._sites[site] = (next_at, skipped + 1)
                return False
            if len(self._sites) >= self.MAX_SITES and site not in self._sites:
                self._sites.clear()
            self._sites[site] = (now + self._interval, 0)
        if skipped:
            record.msg = f"{record.getMessage()} ({skipped} more like this not logged)"
            record.args = None
        return True


# Control characters (C0, DEL, C1) and Unicode line breaks: in a message they could forge or hide lines.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def _safe(message: str) -> str:
    """`message` with its control characters and line breaks escaped (searched first: most have none)."""
    return _UNSAFE.sub(_escape, message) if _UNSAFE.search(message) else message


class TextFormatter(logging.Formatter):
    """The text format, with control characters in messages escaped (`\\n`, `\\x00`): a client's path or
    header that reaches a log line cannot start a line of its own. Tracebacks keep their line breaks."""

    _stamp: tuple[int, str] = (-1, "")  # (second, its local-time text): strftime once a second, not per line

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{self.second_text(int(record.created))},{int(record.msecs):03d}"

    def second_text(self, second: int) -> str:
        if self._stamp[0] != second:
            self._stamp = (second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second)))
        return self._stamp[1]

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _safe(record.message)
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
        self.keep(line, record.levelno)

    def keep(self, line: str, level: int) -> None:
        """Write a formatted line: on the next loop iteration when it is below WARNING and logged on a
        running loop, else now (after whatever is kept). Called with the lock held (reentrant)."""
        loop = None
        if level < logging.WARNING:
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


class RequestLine:
    """An INFO line logged for every request, e.g. `RequestLine(log, "Processing %d texts for embedding")(n)`.

    With `configure_logging`'s text set-up untouched (its handler alone on the root logger, the logger
    propagating straight to it, no other handler or filter on the way), the line is rendered here exactly
    as that handler's formatter renders it, and kept by the handler; with any other set-up (JSON lines, a
    handler or filter someone added, another configuration) it goes through `logger.info` as usual.
    """

    def __init__(self, logger: logging.Logger, fmt: str) -> None:
        self.logger = logger
        self.fmt = fmt

    def __call__(self, *args: object) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        handler = _plain_text_handler(logger)
        if handler is None:
            logger.info(self.fmt, *args, stacklevel=2)  # (the caller's file and line, as a direct call)
            return
        created, msecs = _record_clock()
        message = _safe(self.fmt % args)
        formatter: TextFormatter = handler.formatter  # type: ignore[assignment]
        line = (f"{formatter.second_text(int(created))},{msecs:03d} INFO {logger.name} "
                f"[{request_id_var.get() or '-'}]: {message}{handler.terminator}")
        with handler.lock:  # type: ignore[union-attr]
            handler.keep(line, logging.INFO)


def _record_clock() -> tuple[float, int]:
    """(created, msecs) as this Python's LogRecord computes them (3.13 moved to time_ns), so that a line's
    time is the one a record made at that moment would show, to the millisecond."""
    if sys.version_info >= (3, 13):
        ns = time.time_ns()
        return ns / 1e9, (ns % 1_000_000_000) // 1_000_000
    now = time.time()
    return now, int((now - int(now)) * 1000)


# The text set-up configure_logging installed: (handler, its formatter, its filters), or None.
_text_setup: tuple[LoopBatchedStreamHandler, TextFormatter, list[Any]] | None = None


def _plain_text_handler(logger: logging.Logger) -> LoopBatchedStreamHandler | None:
    """configure_logging's text handler when a record from `logger` would reach it and only it, unchanged."""
    setup = _text_setup
    if setup is None:
        return None
    handler, formatter, filters = setup
    root = logging.root
    if (logger.handlers or logger.filters or not logger.propagate or logger.parent is not root
            or root.filters or len(root.handlers) != 1 or root.handlers[0] is not handler
            or handler.formatter is not formatter or handler.level > logging.INFO
            or handler.filters != filters):
        return None
    return handler


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Replace the root handlers with one stderr handler in the chosen format, with request ids."""
    global _text_setup
    handler = LoopBatchedStreamHandler(sys.stderr)
    handler.addFilter(RepeatLimiter())  # first: a record it drops gets no further work
    handler.addFilter(RequestIdFilter())
    formatter = JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("embedding_service").setLevel(level)
    _text_setup = (handler, formatter, list(handler.filters)) if isinstance(formatter, TextFormatter) else None
