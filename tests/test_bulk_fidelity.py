"""In-process bulk embeds exactly as `serve` with the same settings: the same vectors as the server's answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from .conftest import ServerProcess, has_module

pytestmark = pytest.mark.slow

TEXTS = [f"Document {i}: {'bulk embedding keeps the server vectors ' * (1 + i % 5)}" for i in range(48)]


def bulk(tmp_path: Path, *args: str) -> np.ndarray:
    source = tmp_path / "in.txt"
    source.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out.parquet"
    result = subprocess.run([sys.executable, "-m", "embedding_service", "embed", str(source), "-o", str(out),
                             "--overwrite", "--chunk-rows", "20", "--log-level", "WARNING", *args],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert result.returncode == 0, result.stderr
    column = pq.read_table(out).column("embedding").combine_chunks()
    return column.values.to_numpy().reshape(len(TEXTS), column.type.list_size)


def served(server: ServerProcess, **extra: object) -> np.ndarray:
    body = httpx.post(server.url + "/v1/embeddings", json={"input": TEXTS, **extra}, timeout=300).json()
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float32)


@pytest.mark.parametrize("engine", ["torch", pytest.param("vllm", marks=[
    pytest.mark.vllm, pytest.mark.skipif(not has_module("vllm"), reason="needs vllm")])])
def test_in_process_vectors_equal_the_servers(server_factory: type[ServerProcess], tmp_path: Path,
                                              engine: str) -> None:
    settings = ["--demo", "--engine", engine, "--dtype", "float32"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    server = server_factory(settings, env=env)
    server.wait_healthy(300)
    instruction = "Given a web search query, retrieve relevant passages"
    want_plain = served(server)
    # The prompt rules are the engine's, not the backend's: one engine checks them (a vLLM start costs a minute).
    want_instructed = served(server, instruction=instruction) if engine == "torch" else None
    server.stop()
    assert np.std(want_plain[:, 0]) > 0.01
    # Batches differ (the server's are formed by arrival): equal to float32 rounding.
    np.testing.assert_allclose(bulk(tmp_path, *settings), want_plain, atol=2e-6)
    if want_instructed is not None:
        assert not np.allclose(want_plain, want_instructed, atol=1e-3)
        np.testing.assert_allclose(bulk(tmp_path, *settings, "--instruction", instruction), want_instructed, atol=2e-6)
