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


class _Peer:
    """One API process's connection: its requests in flight, by id (a CANCEL or its end cancels them)."""

    def __init__(self, host: EngineHost) -> None:
        self.host = host
        self.running: dict[int, asyncio.Task[None]] = {}
        self.channel = wire.Channel(self.on_frame, self.on_lost)

    def on_frame(self, kind: int, payload: bytes) -> None:
        if kind == wire.SUBMIT:
            request_id, index, seqs, seconds_left = wire.decode_submit(payload)
            task = asyncio.get_running_loop().create_task(self.host.run(self.channel, request_id, index, seqs,
                                                                        seconds_left))
            self.running[request_id] = task
            task.add_done_callback(functools.partial(self._forget, request_id))
        elif kind == wire.CANCEL:
            cancelled = self.running.pop(wire.decode_id(payload), None)
            if cancelled is not None:
                cancelled.cancel()
        elif kind == wire.HELLO:
            log.debug("API process %s connected", wire.content(payload).get("pid"))
            self.host.hello(self.channel)

    def _forget(self, request_id: int, _task: asyncio.Task[None]) -> None:
        self.running.pop(request_id, None)

    def on_lost(self, _exc: Exception | None) -> None:
        # The API process exited (or died): its requests have no one to answer.
        self.host.peers.discard(self.channel)
        for task in self.running.values():
            task.cancel()


class EngineHost:
    def __init__(self, engines: Sequence[EngineCore], api_processes: int) -> None:
        self.engines = list(engines)
        self.api_processes = api_processes
        self.peers: set[wire.Channel] = set()
        self._hellos = 0
        self._models: bytes | None = None  # the MODELS frame, once every model has loaded
        self._announced = False
        self._server: asyncio.AbstractServer | None = None

    async def start(self, path: str) -> None:
        self._server = await asyncio.get_running_loop().create_unix_server(self._connected, path)

    def _connected(self) -> wire.Channel:
        peer = _Peer(self)
        self.peers.add(peer.channel)
        return peer.channel

    def models_loaded(self) -> None:
        """Every engine has loaded: the API processes may serve once all have connected."""
        facts: list[tuple[BackendInfo, tuple[str, Any]]] = []
        for engine in self.engines:
            assert engine.info is not None
            facts.append((engine.info, tokenizer_recipe(engine.backend)))
        self._models = wire.message(wire.MODELS, facts)
        self._announce()

    def hello(self, channel: wire.Channel) -> None:
        self._hellos += 1
        if self._announced and self._models is not None:
            channel.put(self._models)  # (a restarted API process)
        else:
            self._announce()

    def _announce(self) -> None:
        if self._models is None or (not self._announced and self._hellos < self.api_processes):
            return
        self._announced = True
        for peer in self.peers:
            peer.put(self._models)

    def model_died(self, index: int, death: str) -> None:
        """Tell every API process (their requests for it answer 503 and they exit, as one process does)."""
        for peer in self.peers:
            peer.put(wire.message(wire.STATE, {index: death}))

    async def run(self, channel: wire.Channel, request_id: int, index: int, seqs: list[list[int]],
                  seconds_left: float) -> None:
        try:
            engine = self.engines[index]
            rows, queued, compute = await engine.submit(seqs, time.monotonic() + seconds_left)
            out = wire.encode_rows(request_id, rows, queued, compute)
        except ServiceError as exc:
            out = wire.encode_error(request_id, exc)
        except IndexError:
            out = wire.encode_error(request_id, ServiceError(ErrorKind.INTERNAL, f"no model {index}"))
        if not channel.closing:
            channel.put(out)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for peer in list(self.peers):
            peer.close()
