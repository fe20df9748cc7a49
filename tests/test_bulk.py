"""`embedding-service embed`: a file in, vectors out in input order, equal to direct requests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from .conftest import ServerProcess

pytestmark = pytest.mark.slow


def test_embed_file_to_npy_and_jsonl(server_factory: type[ServerProcess], tmp_path: Path) -> None:
    server = server_factory(["--engine", "fake", "--max-batch-size", "8"])
    server.wait_healthy(60)
    texts = [f"line number {i} with words" for i in range(50)]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts[:25]) + "\n\n" + "\n".join(texts[25:]) + "\n")  # a blank line is skipped
    for name in ("out.npy", "out.jsonl"):
        result = subprocess.run([sys.executable, "-m", "embedding_service", "embed", str(source), "-o",
                                 str(tmp_path / name), "--url", server.url + "/v1", "--batch-size", "7",
                                 "--no-progress"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    matrix = np.load(tmp_path / "out.npy")
    rows = [orjson.loads(line) for line in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert matrix.shape[0] == len(texts) == len(rows)
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows], dtype=np.float32), matrix, atol=1e-7)
    direct = httpx.post(server.url + "/v1/embeddings", json={"input": texts[30:33]}, timeout=30).json()
    np.testing.assert_allclose(np.array([d["embedding"] for d in direct["data"]], dtype=np.float32),
                               matrix[30:33], atol=1e-7)
