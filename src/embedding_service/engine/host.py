"""The engine process's side of `api_processes > 1`: one batcher per model, fed by every API process.

Each API process connects once over a Unix socket (engine/wire.py) and sends token ids; each request is
submitted to its model's engine as a local request would be (the same queue bounds, timeouts and errors),
and its rows or its error go back on the same connection. The models' facts (and how to rebuild their
tokenizers) go to the API processes once every model has loaded and every API process has connected, so
that /health turns ready in all of them together; a restarted API process gets them when it connects.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

from ..backends.base import BackendInfo
from ..errors import ErrorKind, ServiceError
from . import wire
from .core import EngineCore
from .remote import tokenizer_recipe

__all__ = ["EngineHost"]

log = logging.getLogger("embedding_service")


def _forget(running: dict[int, asyncio.Task[None]], request_id: int, _task: asyncio.Task[None]) -> None:
    running.pop(request_id, None)


class EngineHost:
    def __init__(self, engines: Sequence[EngineCore], api_processes: int) -> None:
        self.engines = list(engines)
        self.api_processes = api_processes
        self._writers: set[asyncio.StreamWriter] = set()
        self._hellos = 0
        self._models: bytes | None = None  # the MODELS frame, once every model has loaded
        self._announced = False
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, path: str) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path)

    def models_loaded(self) -> None:
        """Every engine has loaded: the API processes may serve once all have connected."""
        facts: list[tuple[BackendInfo, tuple[str, Any]]] = []
        for engine in self.engines:
            assert engine.info is not None
            facts.append((engine.info, tokenizer_recipe(engine.backend)))
        self._models = wire.message(wire.MODELS, facts)
        self._announce()

    def _announce(self) -> None:
        if self._models is None or (not self._announced and self._hellos < self.api_processes):
            return
        self._announced = True
        for writer in self._writers:
            writer.write(self._models)

    def model_died(self, index: int, death: str) -> None:
        """Tell every API process (their requests for it answer 503 and they exit, as one process does)."""
        for writer in self._writers:
            writer.write(wire.message(wire.STATE, {index: death}))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        running: dict[int, asyncio.Task[None]] = {}
        self._writers.add(writer)
        loop = asyncio.get_running_loop()
        try:
            while True:
                kind, payload = await wire.read_frame(reader)
                if kind == wire.SUBMIT:
                    request_id, index, seqs, seconds_left = wire.decode_submit(payload)
                    task = loop.create_task(self._run(writer, request_id, index, seqs, seconds_left))
                    running[request_id] = task
                    task.add_done_callback(functools.partial(_forget, running, request_id))
                elif kind == wire.CANCEL:
                    cancelled = running.pop(wire.decode_id(payload), None)
                    if cancelled is not None:
                        cancelled.cancel()
                elif kind == wire.HELLO:
                    self._hellos += 1
                    log.debug("API process %s connected", wire.content(payload).get("pid"))
                    if self._announced and self._models is not None:
                        writer.write(self._models)
                    else:
                        self._announce()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the API process exited (or died): its requests have no one to answer
        finally:
            self._writers.discard(writer)
            for task in running.values():
                task.cancel()
            writer.close()

    async def _run(self, writer: asyncio.StreamWriter, request_id: int, index: int, seqs: list[list[int]],
                   seconds_left: float) -> None:
        try:
            engine = self.engines[index]
            rows, queued, compute = await engine.submit(seqs, time.monotonic() + seconds_left)
            out = wire.encode_rows(request_id, rows, queued, compute)
        except ServiceError as exc:
            out = wire.encode_error(request_id, exc)
        except IndexError:
            out = wire.encode_error(request_id, ServiceError(ErrorKind.INTERNAL, f"no model {index}"))
        if not writer.is_closing():
            writer.write(out)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
