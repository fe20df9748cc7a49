"""The frames between API processes and the engine process (`api_processes > 1`), over a Unix socket.

Per request, token ids go one way and vectors the other as raw little-endian arrays behind a fixed header:
no JSON, no pickle on the hot path (a MiniLM vector is 1.5 KB of float32, written once and read once). The
rare messages (the models' facts when they are ready, a model's state, an error) are pickled: they come from
the parent process, which the API processes trust as they trust their own code.

A frame is `<IB` (payload length, type) and the payload:
- SUBMIT  (API -> engine): `<QHId?` request id, model index, sequence count, seconds left, pairs; then int32
  lengths, (pairs: int32 second-segment starts, -1 for none), then the int32 ids of every sequence in turn;
- CANCEL  (API -> engine): `<Q` request id (its client hung up: the engine drops it);
- ROWS    (engine -> API): `<QIIdd` request id, rows, dimension, queue and compute seconds; then float32 rows;
- ERROR   (engine -> API): `<Q` request id, then a pickled `ServiceError` description;
- HELLO   (API -> engine): pickled {"pid"}; MODELS and STATE (engine -> API): pickled, see remote.py.
"""

from __future__ import annotations

import asyncio
import itertools
import pickle
import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np

from ..backends.model.pair_tokenizer import TokenPair
from ..errors import ErrorKind, ServiceError

__all__ = ["CANCEL", "ERROR", "HELLO", "MODELS", "ROWS", "STATE", "SUBMIT", "Channel", "content", "decode_error",
           "decode_id", "decode_rows", "decode_submit", "encode_cancel", "encode_error", "encode_rows", "encode_submit",
           "frame", "message"]

SUBMIT, CANCEL, ROWS, ERROR, HELLO, MODELS, STATE = range(1, 8)

_HEAD = struct.Struct("<IB")
_SUBMIT = struct.Struct("<QHId?")
_ROWS = struct.Struct("<QIIdd")
_ID = struct.Struct("<Q")
assert array("i").itemsize == 4 and sys.byteorder == "little"  # the frames' int32, as the machine writes them
MAX_FRAME = 1 << 31  # a request is bounded far below (max_request_tokens, max_inputs_per_request)


class Channel(asyncio.Protocol):
    """One end of the connection: whole frames to `on_frame(kind, payload)` as they arrive (many per read under
    load), `on_lost(exc)` once at its end; `put` queues a frame and frames put in one event-loop turn go out
    in one write (one send, and one wake-up of the peer, for many requests or answers)."""

    def __init__(self, on_frame: Callable[[int, bytes], None], on_lost: Callable[[Exception | None], None]) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._parts: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset, size = 0, len(buffer)
        while size - offset >= _HEAD.size:
            length, kind = _HEAD.unpack_from(buffer, offset)
            if length >= MAX_FRAME:
                raise ValueError(f"frame of {length} bytes")
            end = offset + _HEAD.size + length
            if end > size:
                break
            self.on_frame(kind, bytes(buffer[offset + _HEAD.size:end]))
            offset = end
        if offset:
            del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost(exc)

    @property
    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def put(self, data: bytes) -> None:
        if not self._parts:
            asyncio.get_running_loop().call_soon(self._flush)
        self._parts.append(data)

    def _flush(self) -> None:
        parts, self._parts = self._parts, []
        if not self.closing:
            assert self.transport is not None
            self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def frame(kind: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return _HEAD.pack(len(body), kind) + body


def message(kind: int, content: Any) -> bytes:
    """A rare message (HELLO, MODELS, STATE): pickled."""
    return frame(kind, pickle.dumps(content, protocol=pickle.HIGHEST_PROTOCOL))


def content(payload: bytes) -> Any:
    """A rare message's content (HELLO, MODELS, STATE)."""
    return pickle.loads(payload)


def encode_submit(request_id: int, model: int, seqs: Sequence[Sequence[int]], seconds_left: float) -> bytes:
    lengths = array("i", map(len, seqs))
    ids = array("i")
    for seq in seqs:
        ids.extend(seq)
    pairs = bool(seqs) and isinstance(seqs[0], TokenPair)
    head = _SUBMIT.pack(request_id, model, len(seqs), seconds_left, pairs)
    if not pairs:
        return frame(SUBMIT, head, lengths.tobytes(), ids.tobytes())
    # A reranker's pairs: where each second segment starts (the model's token types), -1 for none.
    marked = cast(Sequence[TokenPair], seqs)
    starts = array("i", (-1 if seq.second_start is None else seq.second_start for seq in marked))
    return frame(SUBMIT, head, lengths.tobytes(), starts.tobytes(), ids.tobytes())


def decode_submit(payload: bytes) -> tuple[int, int, list[list[int]], float]:
    """(request id, model index, sequences as lists of ints (TokenPairs for a reranker's), seconds left)."""
    request_id, model, count, seconds_left, pairs = _SUBMIT.unpack_from(payload)
    start = _SUBMIT.size + 4 * count * (2 if pairs else 1)
    flat = array("i")
    flat.frombytes(payload[start:])
    if count == 1 and not pairs:  # (most requests: one text)
        return request_id, model, [flat.tolist()], seconds_left
    ids = flat.tolist()
    seqs: list[list[int]] = []
    start = 0
    for end in itertools.accumulate(struct.unpack_from(f"<{count}i", payload, _SUBMIT.size)):
        seqs.append(ids[start:end])
        start = end
    if pairs:
        starts = struct.unpack_from(f"<{count}i", payload, _SUBMIT.size + 4 * count)
        seqs = [TokenPair(seq, head=0, tail=0, second_start=None if at < 0 else at) for seq, at in zip(seqs, starts,
                                                                                                      strict=True)]
    return request_id, model, seqs, seconds_left


def encode_rows(request_id: int, rows: np.ndarray, queue_s: float, compute_s: float) -> bytes:
    rows = np.ascontiguousarray(rows, dtype="<f4")
    count, dim = rows.shape
    return frame(ROWS, _ROWS.pack(request_id, count, dim, queue_s, compute_s), rows.tobytes())


def decode_rows(payload: bytes) -> tuple[int, np.ndarray, float, float]:
    request_id, count, dim, queue_s, compute_s = _ROWS.unpack_from(payload)
    rows = np.frombuffer(payload, dtype="<f4", count=count * dim, offset=_ROWS.size).reshape(count, dim)
    return request_id, rows.astype(np.float32, copy=False), queue_s, compute_s


def encode_error(request_id: int, exc: ServiceError) -> bytes:
    described = (exc.kind.value, exc.message, exc.param, exc.code, exc.retry_after_s)
    return frame(ERROR, _ID.pack(request_id), pickle.dumps(described))


def decode_error(payload: bytes) -> tuple[int, ServiceError]:
    (request_id,) = _ID.unpack_from(payload)
    kind, text, param, code, retry_after_s = pickle.loads(payload[_ID.size:])
    return request_id, ServiceError(ErrorKind(kind), text, param=param, code=code, retry_after_s=retry_after_s)


def encode_cancel(request_id: int) -> bytes:
    return frame(CANCEL, _ID.pack(request_id))


def decode_id(payload: bytes) -> int:
    return int(_ID.unpack_from(payload)[0])
