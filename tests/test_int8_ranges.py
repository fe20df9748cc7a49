"""Per-model int8/uint8 ranges (`int8_ranges`) on the fake engine, in process: `calibrate` equals
sentence-transformers' quantize_embeddings calibrated on the model's own vectors of the stated set, kept once
and reused; an operator's .npy/.json file is used as given (Matryoshka `dimensions` take its first columns)
on /v1/embeddings and /v2/embed alike; bad files and values fail the start or the settings with a clear line.
The same on a real model through the Cohere SDK: tests/test_cohere_clients.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from embedding_service.backends.base import BackendLoadError
from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.engine import int8_ranges
from embedding_service.engine.engine import EmbeddingEngine

from .conftest import FakeApp, engine_options, fake_app, make_settings

quantization = pytest.importorskip("sentence_transformers.util.quantization")

TEXTS = ["the quick brown fox", "embeddings map text to vectors", "a third text, longer than the others are"]
DIM = 64


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "embedding-service" / "int8-ranges"


async def _floats_and_typed(app: FakeApp, **extra: object) -> tuple[np.ndarray, dict[str, list]]:
    """The float rows and every int8/uint8 answer of both APIs for TEXTS."""
    floats = (await app.http.post("/v1/embeddings", json={"input": TEXTS, **extra})).json()["data"]
    typed: dict[str, list] = {}
    for kind in ("int8", "uint8"):
        body = (await app.http.post("/v1/embeddings", json={"input": TEXTS, "encoding_format": kind, **extra})).json()
        typed[f"v1 {kind}"] = [row["embedding"] for row in body["data"]]
    cohere = {"texts": TEXTS, "input_type": "search_document", "embedding_types": ["int8", "uint8"],
              **({"output_dimension": extra["dimensions"]} if "dimensions" in extra else {})}
    answer = (await app.http.post("/v2/embed", json=cohere)).json()["embeddings"]
    typed.update({f"v2 {kind}": answer[kind] for kind in ("int8", "uint8")})
    return np.array([row["embedding"] for row in floats], dtype=np.float32), typed


def _assert_quantized_with(floats: np.ndarray, typed: dict[str, list], **reference: object) -> None:
    for name, rows in typed.items():
        expected = quantization.quantize_embeddings(floats, precision=name.split()[1], **reference)
        assert rows == expected.tolist(), name


def _calibration_vectors(backend: FakeBackend) -> np.ndarray:
    """The fake's own vector of each calibration text cut to its 64 tokens (end token kept), one at a time."""
    rows = []
    for ids in backend.tokenize(int8_ranges.calibration_texts()):
        cut = ids if len(ids) <= DIM else [*ids[:DIM - 1], ids[-1]]
        rows.append(backend.embed([cut])[0])
    return np.stack(rows)


async def test_calibrate_equals_sentence_transformers_calibration_and_is_kept(cache_home: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    backend = FakeBackend(dimension=DIM, max_model_len=64)
    async with fake_app(backend=backend, options={"int8_ranges": "calibrate"}) as app:
        floats, typed = await _floats_and_typed(app)
        reference = _calibration_vectors(backend)
        _assert_quantized_with(floats, typed, calibration_embeddings=reference)
        kept = list(cache_home.glob("*.npy"))
        assert len(kept) == 1
        assert np.load(kept[0]).tobytes() == np.vstack((reference.min(0), reference.max(0))).tobytes()
        unit = quantization.quantize_embeddings(floats, "int8", ranges=np.array([[-1.0] * DIM, [1.0] * DIM]))
        assert typed["v1 int8"] != unit.tolist()  # the calibrated ranges do change the bytes

    def no_second_calibration(*args: object) -> np.ndarray:
        raise AssertionError("calibrated again instead of reading the kept ranges")

    calibrate = int8_ranges.calibrate
    monkeypatch.setattr(int8_ranges, "calibrate", no_second_calibration)
    async with fake_app(backend=FakeBackend(dimension=DIM, max_model_len=64),
                        options={"int8_ranges": "calibrate"}) as again:
        assert (await _floats_and_typed(again))[1] == typed
    # another model (here: another dimension) is keyed apart and calibrated for itself
    monkeypatch.setattr(int8_ranges, "calibrate", calibrate)
    async with fake_app(backend=FakeBackend(dimension=32, max_model_len=64), options={"int8_ranges": "calibrate"}):
        assert len(list(cache_home.glob("*.npy"))) == 2


@pytest.mark.parametrize("suffix", [".npy", ".json"])
async def test_an_operator_file_is_used_as_given_and_sliced_for_dimensions(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(7)
    starts = -rng.uniform(0.1, 0.4, DIM)
    ranges = np.vstack((starts, starts + rng.uniform(0.2, 0.8, DIM))).astype(np.float32)
    path = tmp_path / f"ranges{suffix}"
    if suffix == ".npy":
        np.save(path, ranges)
    else:
        path.write_text(json.dumps(ranges.tolist()))
    async with fake_app(options={"int8_ranges": str(path)}) as app:
        floats, typed = await _floats_and_typed(app)
        _assert_quantized_with(floats, typed, ranges=ranges)
        short, typed_short = await _floats_and_typed(app, dimensions=32)
        assert short.shape == (3, 32)
        _assert_quantized_with(short, typed_short, ranges=ranges[:, :32])
        binary = (await app.http.post("/v1/embeddings", json={"input": TEXTS, "encoding_format": "ubinary"})).json()
        assert [r["embedding"] for r in binary["data"]] == quantization.quantize_embeddings(floats, "ubinary").tolist()


@pytest.mark.parametrize(("content", "message"), [
    ([[0.0] * 63, [1.0] * 63], r"expected a \(2, 64\) array"),
    ([[0.5] * DIM, [0.0] * DIM], "dimension 0 starts above its end"),
    ([[float("nan")] * DIM, [1.0] * DIM], "NaN or an infinity"),
    ([[0.0, 1.0], [1.0]], "not a \\(2, dimension\\) array"),
])
async def test_a_bad_file_fails_the_load_naming_it(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "ranges.json"
    path.write_text(json.dumps(content))  # (json writes NaN, and reads it back)
    engine = EmbeddingEngine(FakeBackend(dimension=DIM, max_model_len=64),
                             engine_options(max_model_len=64, int8_ranges=str(path)))
    with pytest.raises(BackendLoadError, match=message):
        await engine.start()
    await engine.stop()


def test_settings_and_models_file(tmp_path: Path) -> None:
    from embedding_service.models_file import read_models_file

    for bad in ("units", str(tmp_path / "missing.npy"), str(tmp_path)):
        with pytest.raises(ValidationError, match="int8_ranges must be unit, calibrate or a readable"):
            make_settings(int8_ranges=bad)
    assert make_settings().int8_ranges == "unit"
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - name: a\n    demo: true\n    int8_ranges: calibrate\n  - name: b\n    demo: true\n")
    first, second = read_models_file(make_settings(models_file=str(models)))
    assert (first.settings.int8_ranges, second.settings.int8_ranges) == ("calibrate", "unit")
