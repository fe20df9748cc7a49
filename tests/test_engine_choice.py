"""engine=auto: vLLM where installed and a fit for the model, else torch; decided without importing vllm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedding_service import service
from embedding_service.backends.model.facts import read_model_facts
from embedding_service.backends.runtime import choice

from .conftest import make_settings


def _model(tmp_path: Path, model_type: str) -> str:
    path = tmp_path / model_type
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(path)


@pytest.fixture
def build(monkeypatch: pytest.MonkeyPatch):
    def set_build(value: str | None) -> None:
        monkeypatch.setattr(choice, "vllm_build", lambda: value)

    return set_build


@pytest.mark.parametrize(
    ("installed", "model_type", "device", "expected"),
    [
        (None, "qwen3", "auto", False),
        ("cpu", "qwen3", "auto", True),
        ("cuda", "qwen3", "auto", True),
        ("cpu", "qwen3", "cuda", False),  # the CPU build cannot drive a GPU
        ("cuda", "qwen3", "cpu", False),
        ("cpu", "bert", "auto", True),  # measured faster than torch on CPU too (bench/RESULTS.md)
        ("cuda", "bert", "auto", True),
        ("cuda", "t5", "auto", False),  # not an architecture we vouch for
    ],
)
def test_vllm_fit(build, tmp_path: Path, installed: str | None, model_type: str, device: str,
                  expected: bool) -> None:
    build(installed)
    use, why = choice.vllm_fit(read_model_facts(_model(tmp_path, model_type)), device)
    assert use is expected
    assert why  # always a reason to log


def test_unknown_model_type_goes_to_vllm_when_installed(build) -> None:
    build("cpu")
    assert choice.vllm_fit(read_model_facts(None))[0] is True
    assert choice.vllm_fit(read_model_facts("/nonexistent/model"))[0] is True


def test_vllm_build_matches_what_is_installed() -> None:
    import importlib.util

    assert (choice.vllm_build() is None) == (importlib.util.find_spec("vllm") is None)


def test_choose_engine_respects_an_explicit_engine_and_logs_auto(build, tmp_path: Path, caplog) -> None:
    build("cpu")
    qwen, bert = read_model_facts(_model(tmp_path, "qwen3")), read_model_facts(_model(tmp_path, "bert"))
    assert service.choose_engine(make_settings(engine="torch"), qwen) == "torch"
    assert service.choose_engine(make_settings(engine="vllm"), bert) == "vllm"
    with caplog.at_level("INFO", logger="embedding_service"):
        assert service.choose_engine(make_settings(engine="auto"), qwen) == "vllm"
        assert service.choose_engine(make_settings(engine="auto"), read_model_facts(_model(tmp_path, "t5"))) == "torch"
    assert sum("engine auto" in record.message for record in caplog.records) == 2


def test_quantize_is_never_silent(build, tmp_path: Path, caplog) -> None:
    """int8 only when asked: auto picks openvino for it (logged); engines without an int8 path refuse it."""
    import pydantic

    build("cpu")
    bert = read_model_facts(_model(tmp_path, "bert"))
    assert service.choose_engine(make_settings(engine="auto"), bert) == "vllm"  # no quantize: exact engine
    with caplog.at_level("INFO", logger="embedding_service"):
        assert service.choose_engine(make_settings(engine="auto", quantize="int8"), bert) == "openvino"
    assert any("quantize=int8" in record.message for record in caplog.records)
    assert service.choose_engine(make_settings(engine="openvino", quantize="int8"), bert) == "openvino"
    for engine in ("torch", "vllm"):
        with pytest.raises(pydantic.ValidationError, match="openvino engine"):
            make_settings(engine=engine, quantize="int8")
