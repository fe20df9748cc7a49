"""Warnings are limited per call site: a client that makes the server warn on every request gets a line a
second, not a line a request (log volume, disks, and the event loop's time stay bounded)."""

from __future__ import annotations

import logging

from embedding_service.logging_config import RepeatLimiter


def _record(level: int, msg: str, *args: object, line: int = 10, name: str = "uvicorn.error") -> logging.LogRecord:
    return logging.LogRecord(name, level, "h11_impl.py", line, msg, args, None)


def test_one_line_per_site_per_interval_then_the_count_of_what_was_not_logged() -> None:
    now = [100.0]
    limiter = RepeatLimiter(interval_s=1.0, clock=lambda: now[0])
    passed = [limiter.filter(_record(logging.WARNING, "Invalid HTTP request %s.", i)) for i in range(500)]
    assert passed == [True] + [False] * 499
    now[0] += 0.99
    assert not limiter.filter(_record(logging.WARNING, "Invalid HTTP request %s.", 500))
    now[0] += 0.02
    later = _record(logging.WARNING, "Invalid HTTP request %s.", 501)
    assert limiter.filter(later)
    assert later.getMessage() == "Invalid HTTP request 501. (500 more like this not logged)"
    quiet = _record(logging.WARNING, "Invalid HTTP request %s.", 502)
    now[0] += 5
    assert limiter.filter(quiet) and quiet.getMessage() == "Invalid HTTP request 502."  # nothing was dropped


def test_sites_are_apart_and_info_lines_are_never_limited() -> None:
    limiter = RepeatLimiter(interval_s=60.0, clock=lambda: 0.0)
    assert limiter.filter(_record(logging.WARNING, "a", line=1))
    assert limiter.filter(_record(logging.ERROR, "b", line=2))  # another line of code
    assert limiter.filter(_record(logging.WARNING, "a", line=1, name="embedding_service"))  # another logger
    assert not limiter.filter(_record(logging.WARNING, "a", line=1))
    assert all(limiter.filter(_record(logging.INFO, "Processing %d texts", n, line=1)) for n in range(100))


def test_the_site_table_is_bounded() -> None:
    limiter = RepeatLimiter(interval_s=60.0, clock=lambda: 0.0)
    for line in range(3 * RepeatLimiter.MAX_SITES):
        limiter.filter(_record(logging.WARNING, "x", line=line))
    assert len(limiter._sites) <= RepeatLimiter.MAX_SITES
