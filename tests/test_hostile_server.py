"""Hostile clients against a real server process (loopback only; every loop bounded in count and time).

Each test is one finding of issue 12, with the bound it measured in its assertion: slow and half-sent
connections, oversized headers, connection floods, spoofed proxy headers, signals during a load, and a
drain that must answer every connection the kernel accepted.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from .conftest import ServerProcess

pytestmark = pytest.mark.slow

FAKE = ["--engine", "fake", "--log-level", "WARNING"]


def open_files_limit(soft: int, hard: int) -> Callable[[], None]:
    """A preexec_fn that starts the server with this open-file limit (what a small box or container has)."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return apply


def ensure_own_file_limit(needed: int) -> int:
    """Raise this (test) process's soft open-file limit to `needed` if the hard limit allows; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def read_response(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or `timeout`), and when it closed (inf if it did not)."""
    sock.settimeout(0.2)
    started = time.monotonic()
    data = b""
    while time.monotonic() < started + timeout:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, time.monotonic() - started
        if not chunk:
            return data, time.monotonic() - started
        data += chunk
    return data, float("inf")


def health_latency(url: str, tries: int = 10) -> float:
    """The worst of `tries` GET /health, each on a new connection (what a load balancer's probe does)."""
    worst = 0.0
    for _ in range(tries):
        started = time.perf_counter()
        response = httpx.get(url + "/health", timeout=5)
        worst = max(worst, time.perf_counter() - started)
        assert response.status_code == 200
    return worst


def test_silent_half_header_and_half_body_connections_are_closed_at_their_deadline(
        server_factory: type[ServerProcess]) -> None:
    server = server_factory([*FAKE, "--header-timeout-s", "1", "--body-timeout-s", "2"])
    server.wait_healthy(60)
    silent = socket.create_connection(("127.0.0.1", server.port))
    half_header = socket.create_connection(("127.0.0.1", server.port))
    half_header.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-")
    half_body = socket.create_connection(("127.0.0.1", server.port))
    half_body.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"input\": ")
    results = {name: read_response(sock, 8) for name, sock in
               (("silent", silent), ("half_header", half_header), ("half_body", half_body))}
    print("\n" + ", ".join(f"{name}: closed after {after:.2f}s" for name, (_data, after) in results.items()))
    # Measured: 1.0 s and 2.0 s (+ up to 0.2 s of this loop's polling); before: open for ever.
    for name, limit in (("silent", 1), ("half_header", 1), ("half_body", 2)):
        data, after = results[name]
        assert after < limit + 1.0, (name, after)
        assert data.startswith(b"HTTP/1.1 408 "), (name, data[:80])
        assert b'"code":"request_timeout"' in data
    assert health_latency(server.url, 3) < 1.0  # and the server goes on serving


def test_oversized_headers_get_431_and_the_connection_closes(server_factory: type[ServerProcess]) -> None:
    server = server_factory([*FAKE, "--max-header-bytes", "8192"])
    server.wait_healthy(60)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sent = 0
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"a" * 1000) for n in range(64))  # 64 KiB of headers
    sock.settimeout(5)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        while sent < 64 << 20:  # never finished: the server must cut it off, not buffer 64 MiB
            sock.sendall(filler)
            sent += len(filler)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    data, after = read_response(sock, 5)
    print(f"\nheader flood: cut off after {sent >> 10} KiB sent, closed after {after:.2f}s: {data[:40]!r}")
    assert sent < 16 << 20  # what socket buffers hold; before: all 64 MiB were taken in
    assert after < 5
    assert health_latency(server.url, 3) < 1.0


def test_thousands_of_slow_connections_leave_health_answering_and_the_process_under_its_file_limit(
        server_factory: type[ServerProcess]) -> None:
    # The server runs with 2048 files, its hard limit too (a small container): it cannot raise it, so 5,000
    # half-sent requests are more connections than it can hold. Before: /health got resets (EMFILE).
    count = 5000
    have = ensure_own_file_limit(count + 512)
    if have < count + 256:
        count = have - 256
    if count < 3000:
        pytest.skip(f"this process may open only {have} files")
    server = server_factory([*FAKE, "--header-timeout-s", "30"], preexec_fn=open_files_limit(2048, 2048))
    server.wait_healthy(60)
    unloaded = health_latency(server.url, 5)
    slow: list[socket.socket] = []
    refused = 0
    started = time.monotonic()
    try:
        for _ in range(count):
            if time.monotonic() > started + 60:
                break
            try:
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=2)
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                slow.append(sock)
            except OSError:
                refused += 1
        loaded = health_latency(server.url, 10)
        fds = len(list(Path(f"/proc/{server.proc.pid}/fd").iterdir()))
        evicted = sum(1 for sock in slow[:200] if read_response(sock, 0.05)[1] != float("inf"))
    finally:
        for sock in slow:
            sock.close()
    print(f"\n{len(slow)} slow connections ({refused} refused): /health {unloaded * 1000:.1f} ms unloaded, "
          f"worst {loaded * 1000:.1f} ms loaded; server fds {fds} of 2048; oldest 200: {evicted} closed")
    assert len(slow) + refused >= count * 0.99
    assert loaded < 1.0  # measured: ~10-40 ms on 2 busy cores
    assert fds < 2048 - 128  # kept its reserve
    assert evicted >= 150  # the oldest slow connections made room
    assert server.proc.poll() is None


def test_no_server_banner_head_health_and_forwarded_for_is_not_trusted_by_default(
        server_factory: type[ServerProcess]) -> None:
    server = server_factory([*FAKE, "--rate-limit-rpm", "3"])
    server.wait_healthy(60)
    health = httpx.get(server.url + "/health", timeout=5)
    assert "server" not in health.headers
    head = httpx.head(server.url + "/health", timeout=5)
    assert head.status_code == 200 and head.content == b""
    statuses = [httpx.post(server.url + "/v1/embeddings", json={"input": "x"}, timeout=5,
                           headers={"X-Forwarded-For": f"10.0.0.{n}"}).status_code for n in range(5)]
    assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429], statuses  # one client: 127.0.0.1


def test_forwarded_for_is_trusted_from_a_named_proxy(server_factory: type[ServerProcess]) -> None:
    server = server_factory([*FAKE, "--rate-limit-rpm", "2", "--forwarded-allow-ips", "127.0.0.1"])
    server.wait_healthy(60)
    statuses = [httpx.post(server.url + "/v1/embeddings", json={"input": "x"}, timeout=5,
                           headers={"X-Forwarded-For": f"10.0.0.{n % 2}"}).status_code for n in range(4)]
    assert statuses == [200, 200, 200, 200]  # two clients behind the proxy, two requests each


def test_sigterm_during_the_model_load_exits_at_once(server_factory: type[ServerProcess]) -> None:
    server = server_factory([*FAKE, "--fake-load-delay-ms", "20000", "--shutdown-timeout", "1"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # listening (health 503 "loading") while the model loads
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 503:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(25)
    exited_after = time.monotonic() - signalled
    print(f"\nSIGTERM during a 20 s load: exit {code} after {exited_after:.2f}s")
    assert code == 0 and exited_after < 1 + 1.5, exited_after  # before: waited for the 20 s load


async def _one_request(port: int, index: int) -> str:
    """One request on its own connection: 'answered', 'refused' (never accepted) or 'reset' (accepted, no
    HTTP answer)."""
    body = b'{"input": "drain %d"}' % index
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 3)
    except (OSError, TimeoutError):
        return "refused"
    try:
        writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
        await asyncio.wait_for(reader.read(), 10)
    except (OSError, TimeoutError):
        return "reset"
    finally:
        writer.close()
    if status.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 503 ")):
        return "answered"
    return "reset" if not status else f"status {status[:12]!r}"


async def _clients(port: int, clients: int, until: float) -> dict[str, int]:
    outcomes: dict[str, int] = {}

    async def client(number: int) -> None:
        index = 0
        while time.monotonic() < until:
            outcome = await _one_request(port, number * 100_000 + index)
            index += 1
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if outcome == "refused":
                await asyncio.sleep(0.05)

    await asyncio.gather(*(client(n) for n in range(clients)))
    return outcomes


def _drain_run(server: ServerProcess) -> tuple[dict[str, int], int]:
    async def scenario() -> dict[str, int]:
        load = asyncio.ensure_future(_clients(server.port, 16, time.monotonic() + 5.0))
        await asyncio.sleep(2.0)
        server.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(load, 30)

    outcomes = asyncio.run(scenario())
    return outcomes, server.proc.wait(20)


def test_drain_answers_every_accepted_connection_ten_runs_in_a_row(
        server_factory: type[ServerProcess]) -> None:
    # 16 clients, one connection per request; SIGTERM after 2 s; clients go on for 3 s more. Every
    # connection the kernel accepted must get an HTTP answer (200, or 503 + Connection: close), run after
    # run. Before: one reset in about one run in two (plain uvicorn closes its listener over its backlog).
    totals: dict[str, int] = {}
    for run in range(10):
        server = server_factory([*FAKE, "--fake-delay-ms", "5", "--shutdown-timeout", "5"])
        server.wait_healthy(60)
        outcomes, code = _drain_run(server)
        print(f"\nrun {run}: {outcomes}, exit {code}")
        assert code == 0
        assert outcomes.get("answered", 0) > 100
        assert set(outcomes) <= {"answered", "refused"}, (run, outcomes)
        for key, value in outcomes.items():
            totals[key] = totals.get(key, 0) + value
    print(f"\n10 runs: {totals}")


def wait_all_workers_healthy(url: str, timeout: float = 60) -> None:
    """Until 20 probes in a row, each on a new connection (so any worker may take it), answer 200."""
    deadline = time.monotonic() + timeout
    streak = 0
    while streak < 20 and time.monotonic() < deadline:
        streak = streak + 1 if httpx.get(url + "/health", timeout=5).status_code == 200 else 0
        if not streak:
            time.sleep(0.2)
    assert streak >= 20, "a worker never became healthy"


def test_workers_drain_too(server_factory: type[ServerProcess]) -> None:
    server = server_factory([*FAKE, "--workers", "2", "--fake-delay-ms", "400", "--shutdown-timeout", "5"])
    server.wait_healthy(90)
    wait_all_workers_healthy(server.url)

    async def scenario() -> tuple[list[int], dict[str, int], float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
            inflight = [asyncio.ensure_future(http.post("/v1/embeddings", json={"input": f"slow {n}"},
                                                        headers={"Connection": "close"})) for n in range(6)]
            await asyncio.sleep(0.2)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            others = asyncio.ensure_future(_clients(server.port, 4, time.monotonic() + 1.5))
            responses = await asyncio.gather(*inflight)
            outcomes = await others
            while server.proc.poll() is None and time.monotonic() < signalled + 20:
                await asyncio.sleep(0.05)
            return [r.status_code for r in responses], outcomes, time.monotonic() - signalled

    statuses, outcomes, exited_after = asyncio.run(scenario())
    print(f"\nworkers=2 drain: in flight {statuses}, new {outcomes}, exit after {exited_after:.2f}s")
    assert statuses == [200] * 6  # accepted before SIGTERM: served
    assert set(outcomes) <= {"answered", "refused"}
    assert server.proc.returncode == 0 and exited_after < 5 + 2


def test_sub_second_shutdown_timeout_is_a_bound_with_workers(server_factory: type[ServerProcess]) -> None:
    # Before: uvicorn's workers got int(0.5) = 0 = no timeout, and waited for the 20 s batch.
    server = server_factory([*FAKE, "--workers", "2", "--fake-delay-ms", "20000", "--shutdown-timeout", "0.5"])
    server.wait_healthy(90)
    wait_all_workers_healthy(server.url)

    async def scenario() -> float:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            slow = asyncio.ensure_future(http.post("/v1/embeddings", json={"input": "stuck"}))
            await asyncio.sleep(0.5)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            while server.proc.poll() is None and time.monotonic() < signalled + 15:
                await asyncio.sleep(0.05)
            await slow
            return time.monotonic() - signalled

    exited_after = asyncio.run(scenario())
    print(f"\nworkers=2, shutdown_timeout 0.5 with a stuck batch: exit after {exited_after:.2f}s")
    assert server.proc.returncode == 0 and exited_after < 0.5 + 2.5


def test_a_body_still_arriving_at_sigterm_is_served(server_factory: type[ServerProcess]) -> None:
    server = server_factory([*FAKE, "--shutdown-timeout", "10"])
    server.wait_healthy(60)
    body = b'{"input": "accepted before the signal"}'
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body[:10]))
    time.sleep(0.3)  # the request is in: headers read, body under way
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    sock.sendall(body[10:])
    data, _after = read_response(sock, 10)
    code = server.proc.wait(15)
    print(f"\nbody finished 0.5 s after SIGTERM: {data[:15]!r}, exit {code} after "
          f"{time.monotonic() - signalled:.2f}s")
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]  # before: 503 shutting_down
    assert code == 0


def test_a_flood_of_malformed_requests_logs_a_line_a_second(server_factory: type[ServerProcess]) -> None:
    """uvicorn warns on every malformed HTTP request: 300 of them from one loop wrote 300 lines (6,000 a second
    on loopback, ~1.5 GB of log an hour). Now one line, and the next one a second later counts the rest."""
    server = server_factory([*FAKE])
    server.wait_healthy(60)

    def garbage(count: int) -> None:
        for _ in range(count):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(b"GARBAGE \x00\x01 nonsense\r\n\r\n")
                read_response(sock, 2)

    garbage(300)
    time.sleep(1.2)
    garbage(1)
    assert health_latency(server.url, 3) < 1.0
    lines = [line for line in server.log().splitlines() if "Invalid HTTP request" in line]
    print(f"\n300 + 1 malformed requests: {len(lines)} log lines: {lines}")
    assert len(lines) == 2, lines
    assert lines[1].endswith("(299 more like this not logged)")
