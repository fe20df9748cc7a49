"""The CPU runtime settings `serve` chooses: the model's OpenMP threads spin briefly when idle (not libgomp's
several ms), oneDNN keeps a bounded kernel cache; the user's choice wins, and `serve` sets them before torch
is imported (libgomp reads its variables once, when it loads)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from embedding_service.backends.model.facts import read_model_facts
from embedding_service.service import (
    GOMP_SPINCOUNT,
    ONEDNN_PRIMITIVE_CACHE,
    choose_engine,
    onednn_cache_for,
    openmp_waits_for,
)

from .conftest import free_port, make_settings


@pytest.mark.parametrize("engine", ["torch", "vllm"])
def test_openmp_engines_spin_briefly(engine: str) -> None:
    chosen = choose_engine(make_settings(engine=engine), read_model_facts(None))
    assert openmp_waits_for([chosen], {}) == {"GOMP_SPINCOUNT": GOMP_SPINCOUNT}
    assert 0 < int(GOMP_SPINCOUNT) < 300_000  # libgomp's own default, the one that starved the event loop


def test_one_openmp_runtime_serves_both_models() -> None:
    assert openmp_waits_for(["vllm", "torch"], {}) == {"GOMP_SPINCOUNT": GOMP_SPINCOUNT}
    assert openmp_waits_for(["openvino", "torch"], {}) == {"GOMP_SPINCOUNT": GOMP_SPINCOUNT}
    assert openmp_waits_for(["openvino"], {}) == {}
    assert openmp_waits_for(["fake"], {}) == {}


@pytest.mark.parametrize("user", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "INFINITE"}])
def test_user_choice_is_kept(user: dict[str, str]) -> None:
    assert openmp_waits_for(["vllm"], user) == {}
    assert openmp_waits_for(["torch"], user) == {}


def test_onednn_kernel_cache_is_bounded_for_the_engines_that_use_it_unless_the_user_chose() -> None:
    bounded = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": ONEDNN_PRIMITIVE_CACHE}
    assert onednn_cache_for(["vllm"], {}) == onednn_cache_for(["openvino", "torch"], {}) == bounded
    assert 0 < int(ONEDNN_PRIMITIVE_CACHE) < 1024  # oneDNN's default: the one that grew with every batch shape
    assert onednn_cache_for(["openvino"], {}) == onednn_cache_for(["fake"], {}) == {}
    for user in ({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}, {"DNNL_PRIMITIVE_CACHE_CAPACITY": "0"}):
        assert onednn_cache_for(["vllm", "torch"], user) == {}


def test_auto_resolves_to_an_openmp_engine(minilm_dir) -> None:
    facts = read_model_facts(str(minilm_dir))
    chosen = openmp_waits_for([choose_engine(make_settings(engine="auto"), facts)], {})
    assert chosen == {"GOMP_SPINCOUNT": GOMP_SPINCOUNT}


def test_serve_sets_it_before_torch_loads(tmp_path, minilm_dir) -> None:
    """`serve` plans, sets the variables, and only then imports torch: run its first steps in a fresh process
    (as the CLI does) and look at os.environ and sys.modules at the moment the engines are built."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys\n"
        "import embedding_service.assembly as assembly\n"
        "def stop(settings, plan, sock=None):\n"
        "    print('torch-loaded' if 'torch' in sys.modules else 'torch-not-loaded')\n"
        "    print('GOMP_SPINCOUNT=' + os.environ.get('GOMP_SPINCOUNT', ''))\n"
        "    print('OMP_WAIT_POLICY=' + os.environ.get('OMP_WAIT_POLICY', ''))\n"
        "    print('ONEDNN_PRIMITIVE_CACHE_CAPACITY=' + os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY', ''))\n"
        "    return 0\n"
        "assembly.serve_planned = stop\n"
        "from embedding_service.config import EmbeddingConfig\n"
        f"sys.exit(assembly.serve(EmbeddingConfig(_env_file=None, model_path={str(minilm_dir)!r}, engine='vllm',"
        f" host='127.0.0.1', port={free_port()}, device='cpu')))\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY",
                        "DNNL_PRIMITIVE_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert "torch-not-loaded" in lines
    assert f"GOMP_SPINCOUNT={GOMP_SPINCOUNT}" in lines
    assert "OMP_WAIT_POLICY=" in lines
    assert f"ONEDNN_PRIMITIVE_CACHE_CAPACITY={ONEDNN_PRIMITIVE_CACHE}" in lines
