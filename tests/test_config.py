"""Configuration: the spec's defaults, EMBEDDING_* env, .env, CLI precedence, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedding_service.cli import build_parser, load_settings
from embedding_service.config import EmbeddingConfig

SPEC_DEFAULTS = {
    "model_name": "Qwen/Qwen3-Embedding-0.6B",
    "model_path": None,
    "gpu_memory_utilization": 0.4,
    "max_model_len": 3072,
    "tensor_parallel_size": 1,
    "dtype": "float16",
    "host": "0.0.0.0",
    "port": 8890,
    "workers": 1,
    "max_batch_size": 32,
    "batch_timeout_ms": 10,
    "log_level": "INFO",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("EMBEDDING_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_spec_defaults() -> None:
    settings = EmbeddingConfig()
    for field, value in SPEC_DEFAULTS.items():
        assert getattr(settings, field) == value, field


def test_env_prefix_and_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDDING_GPU_MEMORY_UTILIZATION", "0.7")
    monkeypatch.setenv("EMBEDDING_LOG_LEVEL", "debug")
    settings = EmbeddingConfig()
    assert settings.gpu_memory_utilization == 0.7
    assert settings.log_level == "DEBUG"


def test_precedence_flags_over_env_over_dotenv_over_defaults(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("EMBEDDING_PORT=9001\nEMBEDDING_MAX_BATCH_SIZE=7\nEMBEDDING_WORKERS=3\n")
    monkeypatch.setenv("EMBEDDING_PORT", "9002")
    monkeypatch.setenv("EMBEDDING_MAX_BATCH_SIZE", "8")
    args = build_parser().parse_args(["serve", "--port", "9003"])
    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    settings = load_settings(overrides)
    assert settings.port == 9003  # flag
    assert settings.max_batch_size == 8  # env
    assert settings.workers == 3  # .env
    assert settings.max_model_len == 3072  # default


def test_every_field_has_a_kebab_case_flag() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for field in EmbeddingConfig.model_fields:
        assert "--" + field.replace("_", "-") in help_text


@pytest.mark.parametrize(
    ("flag", "value", "field", "bound"),
    [
        ("--port", "70000", "port", "65535"),
        ("--gpu-memory-utilization", "1.5", "gpu_memory_utilization", "1"),
        ("--dtype", "int4", "dtype", "float16"),
        ("--max-batch-size", "0", "max_batch_size", "1"),
    ],
)
def test_invalid_value_is_one_line_naming_field_and_range(capsys: pytest.CaptureFixture[str], flag: str,
                                                          value: str, field: str, bound: str) -> None:
    args = build_parser().parse_args(["serve", flag, value])
    with pytest.raises(SystemExit) as exited:
        load_settings({k: v for k, v in vars(args).items() if k != "command"})
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert field in err and flag in err and bound in err


def test_spec_shim_class_defaults_can_be_edited() -> None:
    import importlib
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    try:
        shim = importlib.import_module("config.embedding_config")
    finally:
        sys.path.remove(str(root))

    class Edited(shim.EmbeddingConfig):  # what a user does by editing the class attributes
        port: int = 9999

    assert Edited().port == 9999
    assert issubclass(shim.EmbeddingConfig, EmbeddingConfig)


def test_public_model_name_rules() -> None:
    assert EmbeddingConfig().public_model_name == "Qwen/Qwen3-Embedding-0.6B"
    assert EmbeddingConfig(demo=True).public_model_name == "sentence-transformers/all-MiniLM-L6-v2"
    assert EmbeddingConfig(model_path="/models/my-model/").public_model_name == "my-model"
    assert EmbeddingConfig(model_path="/m/x", model_name="org/x").public_model_name == "org/x"
    assert EmbeddingConfig(model_path="/m/x", served_model_name="prod").public_model_name == "prod"
