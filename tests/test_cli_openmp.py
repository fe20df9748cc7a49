"""The service lets torch's OpenMP threads sleep when idle, unless the user set a policy or vLLM runs."""

from __future__ import annotations

import os

import pytest

from embedding_service.backends.model_facts import read_model_facts
from embedding_service.service import choose_engine, passive_openmp_for

from .conftest import make_settings


def test_torch_engine_gets_passive_openmp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    passive_openmp_for(choose_engine(make_settings(engine="torch"), read_model_facts(None)))
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_user_choice_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    passive_openmp_for(choose_engine(make_settings(engine="torch"), read_model_facts(None)))
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_vllm_engine_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    passive_openmp_for(choose_engine(make_settings(engine="vllm"), read_model_facts(None)))
    assert "OMP_WAIT_POLICY" not in os.environ


def test_auto_follows_the_engine_auto_picks(monkeypatch: pytest.MonkeyPatch, minilm_dir) -> None:
    from embedding_service.backends.choice import vllm_fit

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    facts = read_model_facts(str(minilm_dir))
    passive_openmp_for(choose_engine(make_settings(engine="auto"), facts))
    picks_torch = not vllm_fit(facts, "auto")[0]
    assert ("OMP_WAIT_POLICY" in os.environ) == picks_torch
