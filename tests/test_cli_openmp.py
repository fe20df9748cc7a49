"""serve() lets torch's OpenMP threads sleep when idle, unless the user set a policy or vLLM runs."""

from __future__ import annotations

import os

import pytest

from embedding_service.cli import _passive_openmp_for_torch
from tests.conftest import make_settings


def test_torch_engine_gets_passive_openmp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    _passive_openmp_for_torch(make_settings(engine="torch"))


    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_user_choice_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    _passive_openmp_for_torch(make_settings(engine="torch"))


    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_vllm_engine_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    _passive_openmp_for_torch(make_settings(engine="vllm"))


    assert "OMP_WAIT_POLICY" not in os.environ
