"""`embedding-service embed --url`: several servers share the work, retries, refusals naming the row."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from .conftest import ServerProcess, free_port

pytestmark = pytest.mark.slow


def run(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "embedding_service", "embed", *[str(a) for a in args]],
                          capture_output=True, text=True, timeout=timeout)


def vectors(path: Path) -> tuple[list, np.ndarray]:
    table = pq.read_table(path)
    column = table.column("embedding").combine_chunks()
    return table.column("id").to_pylist(), column.values.to_numpy().reshape(len(table), -1)


def corpus(tmp_path: Path, n: int = 120) -> Path:
    path = tmp_path / "in.txt"
    path.write_text("".join(f"remote text {i} {'more ' * (i % 5)}\n" for i in range(n)))
    return path


def test_two_servers_share_the_work_and_match_in_process_and_direct(server_factory: type[ServerProcess],
                                                                     tmp_path: Path) -> None:
    servers = [server_factory(["--engine", "fake", "--max-batch-size", "8"]) for _ in range(2)]
    for server in servers:
        server.wait_healthy(60)
    source = corpus(tmp_path)
    result = run(source, "-o", tmp_path / "http.parquet", "--url", servers[0].url + "/v1", "--url",
                 servers[1].url + "/v1", "--batch-size", "5", "--chunk-rows", "32", "--concurrency", "2")
    assert result.returncode == 0, result.stderr
    assert "embedding-service embed: 120 rows," in result.stderr.splitlines()[-1]
    local = run(source, "-o", tmp_path / "local.parquet", "--engine", "fake", "--log-level", "WARNING")
    assert local.returncode == 0, local.stderr
    ids, remote_vectors = vectors(tmp_path / "http.parquet")
    assert ids == list(range(120))
    np.testing.assert_array_equal(remote_vectors, vectors(tmp_path / "local.parquet")[1])
    texts = source.read_text().split("\n")[40:43]
    direct = httpx.post(servers[1].url + "/v1/embeddings", json={"input": texts}, timeout=30).json()
    np.testing.assert_array_equal(np.array([d["embedding"] for d in direct["data"]], dtype=np.float32),
                                  remote_vectors[40:43])
    for server in servers:  # both took part
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        texts = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("embedding_texts_total")]
        assert texts and 0 < texts[0] < 120, (server.url, texts)


def test_overload_answers_and_a_dead_server_are_retried(server_factory: type[ServerProcess], tmp_path: Path) -> None:
    busy = server_factory(["--engine", "fake", "--fake-delay-ms", "30", "--max-queue-requests", "1",
                           "--max-batch-size", "4"])
    busy.wait_healthy(60)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    source = corpus(tmp_path, 60)
    result = run(source, "-o", tmp_path / "out.parquet", "--url", busy.url + "/v1", "--batch-size", "4",
                 "--concurrency", "6", "--retries", "30")
    assert result.returncode == 0, result.stderr
    assert "answered 503" in result.stderr  # some were refused for overload, then retried
    ids, _ = vectors(tmp_path / "out.parquet")
    assert ids == list(range(60))
    # A server that cannot be reached at all: a few retries, then one line.
    result = run(source, "-o", tmp_path / "never.parquet", "--url", dead, "--retries", "2")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"embedding-service: embed: cannot reach {dead}")


def test_a_refused_row_stops_the_job_naming_it(server_factory: type[ServerProcess], tmp_path: Path) -> None:
    server = server_factory(["--engine", "fake", "--max-model-len", "16"])
    server.wait_healthy(60)
    source = tmp_path / "in.txt"
    rows = [f"short text {i}" for i in range(30)]
    rows[23] = "far too long " * 10
    source.write_text("\n".join(rows) + "\n")
    result = run(source, "-o", tmp_path / "out.parquet", "--url", server.url + "/v1", "--batch-size", "8")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert f"{source}:24: the server refused it (400)" in last and "31 tokens" in last, last
    assert not (tmp_path / "out.parquet").exists()
