"""The log handler writes the INFO lines of one event-loop iteration in one write, and loses or reorders none."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from embedding_service.logging_config import LoopBatchedStreamHandler


class Recorder:
    """A stream that records each write (one write = one system call for a real file)."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, data: str) -> None:
        self.writes.append(data)

    def flush(self) -> None:
        pass

    @property
    def lines(self) -> list[str]:
        return "".join(self.writes).splitlines()


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, Recorder]]:
    stream = Recorder()
    handler = LoopBatchedStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("test_log_batching")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    yield log, stream
    log.removeHandler(handler)


async def test_one_iterations_info_lines_go_out_in_one_write(logged: tuple[logging.Logger, Recorder]) -> None:
    log, stream = logged
    for i in range(5):
        log.info("line %d", i)
    assert stream.writes == []  # kept until the loop runs its next callbacks
    await asyncio.sleep(0)
    assert stream.writes == ["".join(f"INFO line {i}\n" for i in range(5))]
    log.info("next")
    await asyncio.sleep(0)
    assert len(stream.writes) == 2 and stream.lines[-1] == "INFO next"


async def test_warnings_and_other_threads_write_at_once_after_what_is_kept(
        logged: tuple[logging.Logger, Recorder]) -> None:
    log, stream = logged
    log.info("first")
    log.warning("second")  # written now, with "first" before it
    assert stream.lines == ["INFO first", "WARNING second"]
    log.info("third")
    thread = threading.Thread(target=log.info, args=("fourth, from a thread",))
    thread.start()
    thread.join()
    assert stream.lines == ["INFO first", "WARNING second", "INFO third", "INFO fourth, from a thread"]
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert stream.lines[-1] == "INFO fourth, from a thread" and len(stream.lines) == 4


def test_a_loop_that_stops_first_loses_nothing(logged: tuple[logging.Logger, Recorder]) -> None:
    log, stream = logged
    loop = asyncio.new_event_loop()

    async def log_then_stop() -> None:
        log.info("kept")
        loop.stop()  # the loop ends before the write its callback would do

    task = loop.create_task(log_then_stop())
    loop.run_forever()
    loop.close()
    assert task.done() and stream.writes == []
    logging.getLogger("test_log_batching").handlers[0].flush()  # what logging.shutdown does at exit
    assert stream.lines == ["INFO kept"]


def test_without_a_loop_each_line_is_written_at_once(logged: tuple[logging.Logger, Recorder]) -> None:
    log, stream = logged
    log.info("a")
    log.info("b")
    assert stream.writes == ["INFO a\n", "INFO b\n"]


# --- RequestLine: the per-request lines, rendered without the logging machinery when the set-up is ours ---

@pytest.fixture
def our_text_setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    """configure_logging's text set-up, alone on the root logger (as in `serve`), writing to a Recorder."""
    from embedding_service import logging_config

    stream = Recorder()
    monkeypatch.setattr(sys, "stderr", stream)
    root, ours = logging.getLogger(), logging.getLogger("embedding_service")
    saved = (root.handlers[:], root.level, ours.level, logging_config._text_setup)
    try:
        logging_config.configure_logging("INFO")
        yield stream
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        ours.setLevel(saved[2])
        logging_config._text_setup = saved[3]


def only_our_handler() -> None:
    """Take pytest's own capture handlers (added for the test's call phase) off the root logger, as in `serve`."""
    from embedding_service import logging_config

    assert logging_config._text_setup is not None
    logging.getLogger().handlers[:] = [logging_config._text_setup[0]]


LINES = [("Processing %d texts for embedding", (3,), "0123abcd"),
         ("Generated %d embeddings in %.3fs (%.1f texts/s)", (32, 0.5234, 61.23), None),
         ("odd %s", ("a\nb\x00c\u2028d\x9b", ), "client-id.1")]


def test_request_lines_read_exactly_as_logger_info_writes_them(our_text_setup: Recorder,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from embedding_service.logging_config import RequestLine, request_id_var

    only_our_handler()
    log = logging.getLogger("embedding_service")
    made: list[object] = []
    make_record = logging.Logger.makeRecord

    def counted(*args: Any, **kwargs: Any) -> logging.LogRecord:
        made.append(args)
        return make_record(*args, **kwargs)

    monkeypatch.setattr(logging.Logger, "makeRecord", counted)
    for clock in (1_764_700_000_001_000_000, 1_764_700_000_999_999_999, 1_764_786_400_000_000_000):
        monkeypatch.setattr(time, "time_ns", lambda clock=clock: clock)  # (logging reads one of these two)
        monkeypatch.setattr(time, "time", lambda clock=clock: clock / 1e9)
        for fmt, args, request_id in LINES:
            token = request_id_var.set(request_id)
            try:
                RequestLine(log, fmt)(*args)
                log.info(fmt, *args)
            finally:
                request_id_var.reset(token)
    lines = our_text_setup.lines
    assert len(made) == len(lines) // 2 == 3 * len(LINES)  # RequestLine made no record: it took the fast path
    for fast, standard in zip(lines[::2], lines[1::2], strict=True):
        assert fast == standard
    assert "[-]: Generated 32 embeddings in 0.523s (61.2 texts/s)" in lines[2]
    assert lines[4].endswith("[client-id.1]: odd a\\nb\\x00c\\u2028d\\x9b")


async def test_request_lines_on_the_loop_are_kept_for_its_next_iteration(our_text_setup: Recorder) -> None:
    from embedding_service.logging_config import RequestLine

    only_our_handler()
    log = logging.getLogger("embedding_service")
    RequestLine(log, "Processing %d texts for embedding")(1)
    log.info("then a plain line")
    assert our_text_setup.writes == []
    await asyncio.sleep(0)
    assert len(our_text_setup.writes) == 1
    assert [line.split(": ", 1)[1] for line in our_text_setup.lines] == ["Processing 1 texts for embedding",
                                                                        "then a plain line"]


def test_request_lines_go_through_logging_when_the_setup_is_not_ours(our_text_setup: Recorder) -> None:
    from embedding_service.logging_config import RequestLine

    only_our_handler()
    log = logging.getLogger("embedding_service")
    line = RequestLine(log, "Scored %d pairs in %.3fs")
    records: list[logging.LogRecord] = []

    class Catcher(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    catcher = Catcher()
    log.addHandler(catcher)  # someone else's handler on the way: it must see the record, caller and all
    try:
        line(20, 0.25)
    finally:
        log.removeHandler(catcher)
    [record] = records
    assert record.getMessage() == "Scored 20 pairs in 0.250s"
    assert record.funcName == "test_request_lines_go_through_logging_when_the_setup_is_not_ours"
    assert record.filename == "test_log_batching.py"
    assert our_text_setup.lines[-1].endswith("[-]: Scored 20 pairs in 0.250s")
    log.setLevel(logging.WARNING)  # and a level that hides INFO hides it
    line(1, 0.1)
    assert len(our_text_setup.lines) == 1


def test_request_lines_in_the_json_format_are_json(monkeypatch: pytest.MonkeyPatch,
                                                   our_text_setup: Recorder) -> None:
    from embedding_service.logging_config import RequestLine, configure_logging

    monkeypatch.setattr(sys, "stderr", our_text_setup)  # (pytest's capture takes sys.stderr back for the call)
    configure_logging("INFO", "json")  # (replaces the fixture's set-up; the fixture still restores it all)
    RequestLine(logging.getLogger("embedding_service"), "Processing %d texts for embedding")(2)
    [entry] = [json.loads(line) for line in our_text_setup.lines]
    assert entry["message"] == "Processing 2 texts for embedding" and entry["level"] == "INFO"
