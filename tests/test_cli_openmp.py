"""How the model's OpenMP threads wait when idle: torch's sleep, vLLM's spin briefly, the user's choice wins,
and `serve` sets it before torch is imported (libgomp reads it once, when it loads)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from embedding_service.backends.model_facts import read_model_facts
from embedding_service.service import VLLM_GOMP_SPINCOUNT, choose_engine, openmp_waits_for

from .conftest import free_port, make_settings


def test_torch_engine_sleeps_at_once() -> None:
    engine = choose_engine(make_settings(engine="torch"), read_model_facts(None))
    assert openmp_waits_for([engine], {}) == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_vllm_engine_spins_briefly() -> None:
    engine = choose_engine(make_settings(engine="vllm"), read_model_facts(None))
    assert openmp_waits_for([engine], {}) == {"GOMP_SPINCOUNT": VLLM_GOMP_SPINCOUNT}
    assert int(VLLM_GOMP_SPINCOUNT) < 300_000  # libgomp's own default, the one that starved the event loop


def test_one_openmp_runtime_serves_both_models() -> None:
    # vLLM embeddings beside a torch reranker: vLLM's many short ops decide (a sleeping worker per op).
    assert openmp_waits_for(["vllm", "torch"], {}) == {"GOMP_SPINCOUNT": VLLM_GOMP_SPINCOUNT}
    assert openmp_waits_for(["openvino"], {}) == {}
    assert openmp_waits_for(["fake"], {}) == {}


@pytest.mark.parametrize("user", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "INFINITE"}])
def test_user_choice_is_kept(user: dict[str, str]) -> None:
    assert openmp_waits_for(["vllm"], user) == {}
    assert openmp_waits_for(["torch"], user) == {}


def test_auto_follows_the_engine_auto_picks(minilm_dir) -> None:
    from embedding_service.backends.choice import vllm_fit

    facts = read_model_facts(str(minilm_dir))
    chosen = openmp_waits_for([choose_engine(make_settings(engine="auto"), facts)], {})
    picks_vllm = vllm_fit(facts, "auto")[0]
    assert chosen == ({"GOMP_SPINCOUNT": VLLM_GOMP_SPINCOUNT} if picks_vllm else {"OMP_WAIT_POLICY": "PASSIVE"})


def test_serve_sets_it_before_torch_loads(tmp_path, minilm_dir) -> None:
    """`serve` plans, sets the variables, and only then imports torch: run its first steps in a fresh process
    (as the CLI does) and look at os.environ and sys.modules at the moment the engines are built."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys\n"
        "import embedding_service.cli as cli\n"
        "def stop(settings, plan, sock=None):\n"
        "    print('torch-loaded' if 'torch' in sys.modules else 'torch-not-loaded')\n"
        "    print('GOMP_SPINCOUNT=' + os.environ.get('GOMP_SPINCOUNT', ''))\n"
        "    print('OMP_WAIT_POLICY=' + os.environ.get('OMP_WAIT_POLICY', ''))\n"
        "    return 0\n"
        "cli._serve_one = stop\n"
        "from embedding_service.config import EmbeddingConfig\n"
        f"sys.exit(cli.serve(EmbeddingConfig(_env_file=None, model_path={str(minilm_dir)!r}, engine='vllm',"
        f" host='127.0.0.1', port={free_port()}, device='cpu')))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert "torch-not-loaded" in lines
    assert f"GOMP_SPINCOUNT={VLLM_GOMP_SPINCOUNT}" in lines
    assert "OMP_WAIT_POLICY=" in lines
