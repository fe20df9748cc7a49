"""`embedding-service embed --vector-type`: parquet, npy and jsonl outputs of int8/uint8/binary/ubinary vectors,
equal to the float run's vectors through the same rule (vector_types.quantize), chunked or not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedding_service.cli import main
from embedding_service.vector_types import quantize

FAKE = ["--engine", "fake", "--log-level", "WARNING"]
TEXTS = [f"text {i} about {'word ' * (i % 7)}things" for i in range(30)]


def _embed(*args: str | Path) -> int:
    return main(["embed", *[str(a) for a in args], *FAKE])


@pytest.fixture
def floats(tmp_path: Path) -> np.ndarray:
    (tmp_path / "in.txt").write_text("\n".join(TEXTS))
    assert _embed(tmp_path / "in.txt", "-o", tmp_path / "float.npy") == 0
    return np.load(tmp_path / "float.npy")


@pytest.mark.parametrize("kind", ["int8", "uint8", "binary", "ubinary"])
def test_every_format(tmp_path: Path, floats: np.ndarray, kind: str) -> None:
    want = quantize(floats, kind)  # type: ignore[arg-type]
    npy, parquet, jsonl = (tmp_path / f"{kind}.{suffix}" for suffix in ("npy", "parquet", "jsonl"))
    for out in (npy, parquet, jsonl):
        assert _embed(tmp_path / "in.txt", "-o", out, "--vector-type", kind, "--chunk-rows", "7") == 0
    got = np.load(npy)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    column = pq.read_table(parquet).column("embedding").combine_chunks()
    assert pa.types.is_fixed_size_list(column.type) and column.type.value_type == pa.from_numpy_dtype(want.dtype)
    assert column.values.to_numpy().reshape(len(TEXTS), -1).tobytes() == want.tobytes()
    rows = [orjson.loads(line)["embedding"] for line in jsonl.read_bytes().splitlines()]
    assert rows == want.tolist()


def test_the_type_is_part_of_the_job(tmp_path: Path, floats: np.ndarray) -> None:
    out = tmp_path / "out.npy"
    assert _embed(tmp_path / "in.txt", "-o", out, "--vector-type", "int8") == 0
    assert np.load(out).dtype == np.int8
    assert _embed(tmp_path / "in.txt", "-o", out, "--vector-type", "ubinary") != 0  # a finished int8 job
    assert _embed(tmp_path / "in.txt", "-o", out, "--vector-type", "ubinary", "--overwrite") == 0
    assert np.load(out).tobytes() == quantize(floats, "ubinary").tobytes()
