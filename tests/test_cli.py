"""The real command line: start-up errors are one clear line; the spec's entry script serves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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
        assert proc.wait(30) == 0  # a graceful drain on SIGTERM exits 0


def test_prepare_loads_every_model_and_exits_zero() -> None:
    result = run_cli("prepare", "--engine", "fake", "--rerank-model", "acme/reranker")
    assert result.returncode == 0, result.stderr
    ready = [line for line in result.stdout.splitlines() if "model ready" in line]
    assert [line.split(" model ready")[0] for line in ready] == ["embedding-service: embed",
                                                                 "embedding-service: rerank"], result.stdout


def test_prepare_failure_is_one_line_and_nonzero() -> None:
    result = run_cli("prepare", "--engine", "torch", "--model-path", "/nonexistent/model")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("embedding-service: --model-path /nonexistent/model")
    assert "Traceback" not in result.stderr and "model ready" not in result.stdout


def test_prepare_fills_the_openvino_cache_that_serve_then_reads(tmp_path: Path) -> None:
    """An image build or init container runs `prepare`; the server that follows converts nothing."""
    pytest.importorskip("openvino")
    cache = {"EMBEDDING_OPENVINO_CACHE_DIR": str(tmp_path / "openvino")}
    prepared = run_cli("prepare", "--demo", "--engine", "openvino", "--dtype", "float32", env=cache, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert "openvino: exporting" in prepared.stderr and "embed model ready" in prepared.stdout
    assert len(list((tmp_path / "openvino").glob("*/model.xml"))) == 1
    server = ServerProcess(["--demo", "--engine", "openvino", "--dtype", "float32"], env=cache)
    try:
        server.wait_healthy(120)
        response = httpx.post(server.url + "/v1/embeddings", json={"input": "ready"}, timeout=30)
        assert response.status_code == 200, response.text
        log = server.log()
        assert "openvino: using the exported model" in log and "openvino: exporting" not in log, log
    finally:
        server.stop()
