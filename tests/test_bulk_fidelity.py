"""In-process bulk embeds exactly as `serve` with the same settings: the same vectors as the server's answers."""

from __future__ import annotations

import base64
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


def test_batch_invariant_server_in_process_and_over_url_give_the_same_bytes(server_factory: type[ServerProcess],
                                                                           tmp_path: Path) -> None:
    """With --batch-invariant a text's vector is the same bytes in any batch (test_batch_invariant.py shows that
    padding otherwise moves the last bits): alone or together, in-process or over --url (so a resumed job equals
    an uninterrupted one exactly), prompts included."""
    settings = ["--demo", "--engine", "torch", "--dtype", "float32", "--batch-invariant"]
    cache_off = ["--result-cache-bytes", "0"]  # every answer computed, none a cached copy of the first
    instruction = "Given a web search query, retrieve relevant passages"
    server = server_factory([*settings, *cache_off])
    server.wait_healthy(300)
    together = served_texts(server, TEXTS)
    instructed = served_texts(server, TEXTS, instruction=instruction)
    np.testing.assert_array_equal(np.concatenate([served_texts(server, [text]) for text in TEXTS]), together)
    np.testing.assert_array_equal(bulk(tmp_path, "--url", server.url + "/v1", "--batch-size", "5",
                                       "--concurrency", "4"), together)
    server.stop()
    assert np.std(together[:, 0]) > 0.01 and not np.allclose(together, instructed, atol=1e-3)
    np.testing.assert_array_equal(bulk(tmp_path, *settings), together)
    np.testing.assert_array_equal(bulk(tmp_path, *settings, "--instruction", instruction), instructed)


def served_texts(server: ServerProcess, texts: list[str], **extra: object) -> np.ndarray:
    body = httpx.post(server.url + "/v1/embeddings", json={"input": texts, "encoding_format": "base64", **extra},
                      timeout=300).json()
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype=np.float32) for d in body["data"]])


@pytest.mark.vllm
@pytest.mark.skipif(not has_module("vllm"), reason="needs vllm")
def test_in_process_vllm_vectors_equal_the_servers(server_factory: type[ServerProcess], tmp_path: Path) -> None:
    settings = ["--demo", "--engine", "vllm", "--dtype", "float32"]
    server = server_factory(settings, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    server.wait_healthy(300)
    want_plain = served(server)
    server.stop()
    assert np.std(want_plain[:, 0]) > 0.01
    # Batches differ (the server's are formed by arrival, vLLM's packing is not batch-invariant): equal to
    # float32 rounding. (The prompt rules are the engine's, not the backend's: the torch test checks them.)
    np.testing.assert_allclose(bulk(tmp_path, *settings), want_plain, atol=2e-6)
