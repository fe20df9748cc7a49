"""Logging: a per-request id on every record, and a text or JSON line format.

The request id lives in a context variable that the request middleware sets; asyncio copies the context
into every task and `run_in_executor` call started while handling the request, so the engine's own lines
("Processing 32 texts for embedding") carry the id too. Records outside a request show "-".
"""

from __future__ import annotations

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


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Replace the root handlers with one stderr handler in the chosen format, with request ids."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("embedding_service").setLevel(level)
