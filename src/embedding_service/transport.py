"""Connection hygiene under the ASGI app: read deadlines, a header size cap and a bound on connections.

uvicorn closes keep-alive connections that sit idle (`timeout_keep_alive`), but a connection that sends
nothing, half a header or half a body stays open for ever, httptools has no limit on header size, and
nothing bounds how many connections are open: enough slow clients exhaust the open-file limit and every
other client, `/health` included, gets resets. uvicorn's `limit_concurrency` does not help there: it
answers 503 to new requests once the count is reached, so slow connections lock out everyone else.

`guarded_protocol` is uvicorn's httptools protocol with, per connection:

- a header deadline from the moment the connection opens (or the next request's first byte arrives) until
  its headers are complete, and a body deadline from then until the body is complete: 408 and close;
- a cap on request line plus header bytes: 431 and close;
- a process-wide bound: past it, the oldest connection that has no request in progress (idle keep-alive, or
  still sending its headers) is closed to make room, so slow clients cannot lock out fast ones. Only when
  every connection holds a request in progress is the new one refused (503).

Each request's scope also carries a `HangupHook` (api/middleware/lifecycle.py): when the connection is lost before a
response is complete, the hooks of the requests still unanswered on it are fired, so that the app need not
keep a task per request reading the connection to learn it.

The fast path pays two timer calls per request (`call_later`/`cancel`, about a microsecond each).

A response that starts before its request's body is all in (a 413 on the declared size, a 401, a 429) says
`Connection: close`, and the rest of that body is never read: the connection stops reading, half-closes once
the response is written, and closes `_LINGER_S` later (what Go's server does). uvicorn read and discarded
such a body on the event loop until its end, on a keep-alive connection: a client declaring 2 GiB got its 413
at once and then kept the loop busy for as long as it went on sending (512 MiB in 0.3 s on loopback).

A response's head and body leave in one write (`CoalescedWrites`): uvicorn writes them separately, and each
write on an idle socket is a system call and a TCP segment of its own. That costs one `call_soon` per
response (the fallback for a head whose body does not follow at once), well under a system call.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .api.middleware.lifecycle import HANGUP_EXTENSION, HangupHook
from .errors import ErrorKind, ServiceError, http_error_bytes

__all__ = ["CoalescedWrites", "ConnectionLimits", "GuardedHttpProtocol", "guarded_protocol", "raise_file_limit"]

log = logging.getLogger("embedding_service")

# Kept free of connections for everything else a server opens: model files, threads, pipes, vLLM's sockets.
_FD_RESERVE = 256

# A connection answered before its request body was in: from the half-close after the response to the close.
# Closing with unread input makes the kernel send a reset, which can destroy a response still on its way.
_LINGER_S = 0.5


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_header_bytes: int = 32768
    max_connections: int = 4096


def raise_file_limit(max_connections: int) -> int:
    """Raise the soft open-file limit towards what `max_connections` needs (never past the hard limit) and
    return the connection bound that fits under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + 4 * _FD_RESERVE
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    fits = max(16, soft - max(_FD_RESERVE, soft // 8))
    if fits < max_connections:
        log.warning("max_connections %d lowered to %d to stay under the open-file limit (%d; raise it with "
                    "ulimit -n or systemd's LimitNOFILE)", max_connections, fits, soft)
    return min(max_connections, fits)


class CoalescedWrites:
    """A transport on which a response's head waits for the first part of its body, and both go out in one
    `writelines` call (one writev under uvloop). A head is a write that starts with `HTTP/`; one not followed
    by another write in the same event-loop turn (a 100 Continue, a streamed body's first part still being
    computed) goes out at the end of that turn. Whatever is not a head is written at once, as before: a
    response is not held back behind the other responses of that turn. Closing writes what waits first; while
    `body_unread` (a request body still arriving) it lingers instead (module doc). Anything else is the
    wrapped transport's."""

    __slots__ = ("_lingering", "_loop", "_pending", "_transport", "body_unread")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None
        self._lingering = False
        self.body_unread = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._pending is not None:
            self._pending.append(data)
            self.flush()
        elif data.startswith(b"HTTP/"):
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.writelines(pending)

    def close(self) -> None:
        self.flush()
        if not self.body_unread or self._transport.is_closing():
            self._transport.close()
        elif not self._lingering:
            self._lingering = True
            self._transport.pause_reading()  # the rest of the body stays in the kernel, unread
            if self._transport.can_write_eof():
                self._transport.write_eof()  # FIN once the response is out: the client sees it end
            self._loop.call_later(_LINGER_S, self._transport.close)

    def is_closing(self) -> bool:
        return self._lingering or self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        waiting = sum(len(part) for part in self._pending) if self._pending else 0
        return waiting + self._transport.get_write_buffer_size()

    def __getattr__(self, name: str) -> Any:  # pause_reading, get_extra_info, abort, ...
        return getattr(self._transport, name)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines, a header cap and the connection bound (see module doc)."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    # Connections with no request in progress, oldest first (a dict keeps insertion order): who is evicted.
    _evictable: ClassVar[dict[GuardedHttpProtocol, None]]
    _open: ClassVar[list[int]]  # [count], shared by the class's connections

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._reading_headers = True
        self._header_bytes = 0
        self._message_ended = False  # a request ended inside the chunk being parsed
        self._counted = False
        self.answered = False  # at least one response completed (drain: this connection was answered)
        self._unanswered_hooks: deque[HangupHook] = deque()  # requests begun and not answered, oldest first
        self._keep_alive = True  # what uvicorn decided for the request whose body is arriving
        self._writes: CoalescedWrites

    # --- connection --------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._writes = CoalescedWrites(transport, self.loop)
        super().connection_made(cast(asyncio.Transport, self._writes))
        if self._open[0] >= self.limits.max_connections and not self._evict_oldest():
            self.close_with(ErrorKind.OVERLOADED, "server is at its connection limit; retry shortly",
                            "too_many_connections")
            return
        self._open[0] += 1
        self._counted = True
        self._evictable[self] = None
        self._arm(self.limits.header_timeout_s, self._header_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)
        while self._unanswered_hooks:
            self._unanswered_hooks.popleft().fire()

    def _forget(self) -> None:
        self._cancel()
        self._evictable.pop(self, None)
        if self._counted:
            self._counted = False
            self._open[0] -= 1

    def _evict_oldest(self) -> bool:
        for victim in self._evictable:
            if victim.awaiting_request:
                victim.close_with(ErrorKind.OVERLOADED, "server is at its connection limit; this connection "
                                  "was the slowest to send its request", "too_many_connections")
            else:
                victim.close_silently()  # idle keep-alive: HTTP lets a server close it at any time
            return True
        return False

    @property
    def awaiting_request(self) -> bool:
        """No request in progress, but one is owed an answer: nothing answered yet on this connection, or
        the first bytes of its next request have arrived."""
        cycle = self.cycle
        idle = cycle is None or cycle.response_complete
        return idle and not self.transport.is_closing() and (not self.answered or self._header_bytes > 0)

    def close_silently(self) -> None:
        self._forget()
        if not self.transport.is_closing():
            self.transport.close()

    def close_with(self, kind: ErrorKind, message: str, code: str) -> None:
        """Answer `kind` (unless a response is under way) and close; the app, if running, sees a disconnect."""
        self._forget()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or not cycle.response_started or cycle.response_complete:
            self.transport.write(http_error_bytes(ServiceError(kind, message, code=code)))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's own late response is dropped
            cycle.message_event.set()
        self.transport.close()

    # --- deadlines -----------------------------------------------------------------------------------------
    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._cancel()
        self._deadline = self.loop.call_later(seconds, callback)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _header_timed_out(self) -> None:
        self._deadline = None
        log.info("closed a connection from %s: no complete request headers within %.0fs",
                 (self.client or ("?",))[0], self.limits.header_timeout_s)
        self.close_with(ErrorKind.REQUEST_TIMEOUT, f"request headers not received within "
                        f"{self.limits.header_timeout_s:g}s", "request_timeout")

    def _body_timed_out(self) -> None:
        self._deadline = None
        log.info("closed a connection from %s: request body not received within %.0fs",
                 (self.client or ("?",))[0], self.limits.body_timeout_s)
        if self.cycle is not None:
            self.cycle.scope["state"]["read_timeout"] = True  # the app side logs 408, not a hang-up
        self.close_with(ErrorKind.REQUEST_TIMEOUT, f"request body not received within "
                        f"{self.limits.body_timeout_s:g}s", "request_timeout")

    # --- parser events --------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._message_ended = False
        super().data_received(data)
        # Bytes that arrived while headers are still incomplete are header bytes (a chunk in which a request
        # ended may also hold its body's tail: not counted; one chunk is at most the loop's read size).
        if self._reading_headers and not self._message_ended and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self.close_with(ErrorKind.HEADER_TOO_LARGE, f"request line and headers exceed "
                                f"{self.limits.max_header_bytes} bytes", "request_header_fields_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        hook = HangupHook()
        self._unanswered_hooks.append(hook)
        self.scope["extensions"] = {HANGUP_EXTENSION: {"hook": hook}}  # (ASGI: an extension's value is a dict)
        if self._deadline is None:  # a keep-alive connection's next request: its headers get the deadline
            self._arm(self.limits.header_timeout_s, self._header_timed_out)

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._header_bytes = 0
        self._evictable.pop(self, None)
        super().on_headers_complete()
        # Until its body is in, a response closes the connection (module doc); uvicorn reads `keep_alive` as
        # the response starts and again as it ends. A request without a body ends before its app runs.
        cycle = self.cycle
        self._keep_alive, cycle.keep_alive = cycle.keep_alive, False
        self._writes.body_unread = True
        if not self.pipeline:  # (a pipelined request's body waits behind the one in progress)
            self._arm(self.limits.body_timeout_s, self._body_timed_out)
        else:
            self._cancel()

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if not cycle.response_started:
            cycle.keep_alive = self._keep_alive
        self._writes.body_unread = False
        super().on_message_complete()
        self._reading_headers = True
        self._message_ended = True
        self._cancel()

    def on_response_complete(self) -> None:
        self.answered = True
        if self._unanswered_hooks:  # (responses go out in the order of their requests)
            self._unanswered_hooks.popleft()
        super().on_response_complete()
        if self._counted and not self.transport.is_closing() and not self.pipeline and self._reading_headers:
            self._evictable[self] = None  # idle keep-alive now: newest of the evictable

    def shutdown(self) -> None:
        self._cancel()
        self._keep_alive = False  # (uvicorn turns keep-alive off: the end of a body must not turn it back on)
        super().shutdown()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedHttpProtocol]:
    """A protocol class for uvicorn's `http=` setting, with its own limits and bookkeeping."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,),
                {"limits": limits, "_evictable": {}, "_open": [0]})
