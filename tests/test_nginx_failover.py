"""The shipped nginx config, for real: three instances behind Debian's nginx on loopback, steady traffic,
one instance crashes (SIGKILL) and another drains (SIGTERM) mid-run, and clients see no error.

Needs the `nginx` binary (CI: `apt-get install -y nginx`); skips cleanly without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import ROOT, ServerProcess, free_port

pytestmark = pytest.mark.slow

SHIPPED = ROOT / "deploy" / "nginx" / "embedding-service.conf"
CLIENTS = 4
MAX_REQUESTS = 3000  # bounds of the whole run, whatever happens
MAX_SECONDS = 90.0
PHASE_SUCCESSES = 150  # successful requests between two events


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def site_config(ports: list[int], listen_port: int, access_log: Path) -> str:
    """The shipped site config with only the addresses changed. Fails loudly if its shape changed."""
    text = SHIPPED.read_text()
    servers = list(re.finditer(r"^(\s+)server 127\.0\.0\.1:\d+ (.*);\n", text, re.MULTILINE))
    assert len(servers) == 2, "expected the two example upstream servers in the shipped config"
    indent, options = servers[0].groups()
    upstream = "".join(f"{indent}server 127.0.0.1:{port} {options};\n" for port in ports)
    first, second = servers
    text = text[: first.start()] + upstream + text[first.end() : second.start()] + text[second.end() :]
    text, count = re.subn(r"^(\s+)listen 80;", rf"\1listen 127.0.0.1:{listen_port};", text,
                          flags=re.MULTILINE)
    assert count == 1
    text, count = re.subn(r"access_log \S+ ", f"access_log {access_log} ", text)
    assert count == 1
    return text


class Nginx:
    """nginx in the foreground (daemon off) with its own prefix, pid file, logs and temp folders."""

    def __init__(self, binary: str, site: str, prefix: Path, port: int) -> None:
        self.prefix = prefix
        self.url = f"http://127.0.0.1:{port}"
        (prefix / "site.conf").write_text(site)
        temp_paths = "\n".join(f"    {kind}_temp_path {prefix}/{kind};"
                               for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (prefix / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
            f"events {{ worker_connections 512; }}\n"
            f"http {{\n{temp_paths}\n    include {prefix}/site.conf;\n}}\n")
        command = [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                   "-e", str(prefix / "error.log")]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.prefix / "error.log").read_text()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("nginx did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def prefix() -> Iterator[Path]:
    # nginx's workers run as an unprivileged user when started as root: the folder must be reachable.
    folder = Path(tempfile.mkdtemp(prefix="nginx-failover-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


class Traffic:
    """CLIENTS threads posting embeddings through nginx until stopped or out of budget."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.sent = 0
        self.stop = threading.Event()
        self.deadline = time.monotonic() + MAX_SECONDS
        self.threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(CLIENTS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _take_ticket(self) -> int | None:
        with self.lock:
            if self.stop.is_set() or self.sent >= MAX_REQUESTS or time.monotonic() > self.deadline:
                return None
            self.sent += 1
            return self.sent

    def _client(self, number: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while (ticket := self._take_ticket()) is not None:
                request_id = f"client{number}-{ticket}"
                try:
                    response = http.post("/v1/embeddings", json={"input": [f"text {ticket}", "fixed text"]},
                                         headers={"X-Request-Id": request_id})
                    body = response.json()
                    good = (response.status_code == 200 and len(body["data"]) == 2
                            and response.headers.get("x-request-id") == request_id)
                    problem = None if good else f"{response.status_code} {response.text[:200]}"
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                with self.lock:
                    if problem is None:
                        self.ok += 1
                    else:
                        self.failures.append(f"{request_id}: {problem}")

    def wait_for(self, successes: int) -> None:
        while self.ok < successes:
            if self.stop.is_set() or not any(t.is_alive() for t in self.threads):
                raise AssertionError(f"traffic ended at {self.ok} successes: {self.failures[:5]}")
            time.sleep(0.02)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            if thread.ident is not None:  # started
                thread.join(timeout=60)


def test_nginx_fails_over_without_client_errors(server_factory: type[ServerProcess], prefix: Path) -> None:
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    servers = [server_factory(["--engine", "fake", "--log-format", "json", "--shutdown-timeout", "10"])
               for _ in range(3)]
    for server in servers:
        server.wait_healthy(timeout=60)
    crashed, drained, survivor = servers
    access_log = prefix / "access.log"
    listen_port = free_port()
    site = site_config([server.port for server in servers], listen_port, access_log)
    nginx = Nginx(binary, site, prefix, listen_port)
    traffic = Traffic(nginx.url)
    try:
        nginx.wait_ready()
        traffic.start()
        traffic.wait_for(PHASE_SUCCESSES)
        crashed.proc.send_signal(signal.SIGKILL)  # a crash: connections reset, nothing drained
        traffic.wait_for(2 * PHASE_SUCCESSES)
        drained.proc.send_signal(signal.SIGTERM)  # a graceful stop: drains, then refuses connections
        traffic.wait_for(3 * PHASE_SUCCESSES)
        traffic.finish()
        assert crashed.proc.wait(10) == -signal.SIGKILL
        # uvicorn re-raises the SIGTERM it handled once shut down, so -SIGTERM is a clean exit too.
        assert drained.proc.wait(30) in (0, -signal.SIGTERM)
        assert survivor.proc.poll() is None
    finally:
        try:
            traffic.finish()
        finally:
            nginx.stop()

    assert traffic.failures == [], f"{len(traffic.failures)} client errors, e.g. {traffic.failures[:5]}"
    assert traffic.ok >= 3 * PHASE_SUCCESSES

    lines = access_log.read_text().splitlines()
    upstreams = [re.search(r"upstream=(.*?) upstream_status=(.*?) rt=", line) for line in lines]
    reached = {port for match in upstreams if match for port in re.findall(r":(\d+)", match.group(1))}
    assert {str(s.port) for s in servers} <= reached, "traffic did not reach every instance"
    # Failover really happened: some requests were tried on one instance, then answered by another.
    retried = [m for m in upstreams if m and ", " in m.group(1)]
    assert retried, "no request was retried on another instance"
    assert all(m.group(2).split(", ")[-1] == "200" for m in retried), [m.group(0) for m in retried]

    # The survivor logged JSON lines, with the request ids the clients sent (through nginx).
    survivor.stop()
    records = [json.loads(line) for line in survivor.log_path.read_text().splitlines() if line.strip()]
    ids = {record.get("request_id") for record in records}
    assert any(isinstance(value, str) and value.startswith("client") for value in ids)
