"""A response goes out in one write: uvicorn writes its head and its body separately; the head waits for the body.

Each write on an idle socket is a system call and a TCP segment (and a wake-up of the client); the fake
engine at 64 clients served ~6% more requests/s with one (bench/RESULTS.md, session 29).
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from embedding_service.transport import CoalescedWrites, ConnectionLimits, guarded_protocol


class RecordingTransport:
    """The socket side: what was written, call by call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[bytes]]] = []
        self.closing = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.calls.append(("write", [data]))

    def writelines(self, parts: list[bytes]) -> None:
        self.calls.append(("writelines", list(parts)))

    def close(self) -> None:
        self.calls.append(("close", []))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    @property
    def sent(self) -> bytes:
        return b"".join(b"".join(parts) for kind, parts in self.calls if kind != "close")


async def test_a_head_waits_for_its_body_and_they_leave_together_at_once() -> None:
    raw = RecordingTransport()
    out = CoalescedWrites(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    out.write(b"HTTP/1.1 200 OK\r\n\r\n")
    out.write(b"")  # (an empty part adds nothing)
    assert raw.calls == [] and out.get_write_buffer_size() == 19  # waiting counts as buffered
    out.write(b"body")
    assert raw.calls == [("writelines", [b"HTTP/1.1 200 OK\r\n\r\n", b"body"])]  # not held to the turn's end
    out.write(b"more body")  # not a head: written at once, as before
    assert raw.calls[1:] == [("write", [b"more body"])]
    await asyncio.sleep(0)
    assert len(raw.calls) == 2


async def test_a_head_alone_leaves_at_the_end_of_the_turn_and_close_writes_what_waits() -> None:
    raw = RecordingTransport()
    out = CoalescedWrites(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    out.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    await asyncio.sleep(0)
    assert raw.calls == [("writelines", [b"HTTP/1.1 100 Continue\r\n\r\n"])]
    out.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n{}")
    out.close()
    assert raw.calls[1:] == [("writelines", [b"HTTP/1.1 408 Request Timeout\r\n\r\n{}"]), ("close", [])]
    await asyncio.sleep(0)
    assert raw.calls[-1] == ("close", [])  # nothing after the close
    assert out.get_extra_info("peername") == ("127.0.0.1", 50000)  # everything else is the socket's


async def app(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


async def test_uvicorns_head_and_body_leave_in_one_call() -> None:
    config = uvicorn.Config(app, http=guarded_protocol(ConnectionLimits()), log_config=None, lifespan="off")
    config.load()
    protocol = config.http_protocol_class(config=config, server_state=ServerState(),  # type: ignore[call-arg]
                                          app_state={})
    raw = RecordingTransport()
    protocol.connection_made(raw)  # type: ignore[arg-type]
    body = b'{"input":"x"}'
    protocol.data_received(b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    for _ in range(50):
        if raw.calls:
            break
        await asyncio.sleep(0.01)
    writes = [call for call in raw.calls if call[0] != "close"]
    assert len(writes) == 1, raw.calls  # uvicorn wrote the head, then the body: one call here
    assert raw.sent.startswith(b"HTTP/1.1 200 OK\r\n") and raw.sent.endswith(b'\r\n\r\n{"ok":true}')
    protocol.connection_lost(None)
