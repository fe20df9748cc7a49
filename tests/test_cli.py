"""The real command line: start-up errors are one clear line; the spec's entry script serves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import pytest

from .conftest import ROOT, ServerProcess, free_port

pytestmark = pytest.mark.slow


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedding_service", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


def test_port_in_use_is_one_clear_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--engine", "fake", "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("embedding-service: port") and "already in use" in lines[-1]
    assert "Traceback" not in result.stderr


def test_missing_model_exits_fast_naming_model_path_and_demo() -> None:
    result = run_cli("serve", "--engine", "torch", "--model-name", "nobody/no-such-model", "--host", "127.0.0.1",
                     "--port", str(free_port()), env={"HF_HUB_OFFLINE": "1"}, timeout=30)
    assert result.returncode == 1
    assert "--model-path" in result.stderr and "--demo" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_flag_value_exits_2_with_one_line() -> None:
    result = run_cli("serve", "--max-model-len", "-5")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "max_model_len" in result.stderr and "--max-model-len" in result.stderr


def test_spec_entry_script_serves() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "embedding_start.py", "--engine", "fake", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = ServerProcess.__new__(ServerProcess)
    server.url, server.proc = f"http://127.0.0.1:{port}", proc
    try:
        deadline_ok = False
        for _ in range(150):
            try:
                if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                    deadline_ok = True
                    break
            except httpx.HTTPError:
                import time

                time.sleep(0.2)
        assert deadline_ok, "embedding_start.py did not become healthy"
        response = httpx.post(server.url + "/v1/embeddings", json={"input": ["Hello, world!"]}, timeout=60)
        assert response.status_code == 200 and len(response.json()["data"]) == 1
    finally:
        proc.terminate()
        assert proc.wait(30) in (0, -15)  # ended cleanly by SIGTERM
