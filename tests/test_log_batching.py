"""The log handler writes the INFO lines of one event-loop iteration in one write, and loses or reorders none."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator

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
