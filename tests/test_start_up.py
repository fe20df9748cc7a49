"""Start-up of several models (docs/models.md, "Probes and start-up"): they load together where their engines
allow and one at a time where not, the first failure stops the start with one line naming the model, and a
plan that cannot fit in a device's memory is refused before anything loads."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from embedding_service.backends.base import BackendInfo, BackendOptions
from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.backends.model.facts import read_model_facts
from embedding_service.backends.runtime.device import GPU_MEMORY_OVERRIDE_ENV, gpu_total_bytes
from embedding_service.engine.engine import EmbeddingEngine
from embedding_service.engine.loading import ModelLoad, ModelLoadError, load_models
from embedding_service.engine.types import EngineState
from embedding_service.memory_fit import Claim, available_bytes, memory_shortfall, model_claim, plan_shortfall
from embedding_service.service import plan_service

from .conftest import backend_options, engine_options, free_port, make_settings

GB, MB = 1 << 30, 1 << 20


# --- loading: together, alone, and the first failure ----------------------------------------------------------

class _Loads:
    """What the test backends saw: how many loads ran at once when each began."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.beside: dict[str, int] = {}  # model -> other loads running when its load began


class _Backend(FakeBackend):
    def __init__(self, name: str, loads: _Loads, *, wait: threading.Barrier | threading.Event | None = None,
                 fail: bool = False) -> None:
        super().__init__(model=name)
        self.loads, self.wait, self.fail = loads, wait, fail

    def load(self) -> BackendInfo:
        with self.loads.lock:
            self.loads.beside[self.model] = self.loads.running
            self.loads.running += 1
        try:
            if isinstance(self.wait, threading.Barrier):
                self.wait.wait(timeout=30)  # broken (an error) unless its partner loads at the same time
            elif isinstance(self.wait, threading.Event):
                self.wait.wait(timeout=30)
            else:
                threading.Event().wait(0.05)  # long enough for a load beside it to show
            if self.fail:
                raise OSError("config.json is unreadable")
            return super().load()
        finally:
            with self.loads.lock:
                self.loads.running -= 1


def _load(backend: FakeBackend, alone: bool = False) -> ModelLoad:
    return ModelLoad(backend.model, "embed", EmbeddingEngine(backend, engine_options()), alone)


async def _stop(loads: list[ModelLoad]) -> None:
    for load in loads:
        await load.engine.stop()


async def test_models_load_together_and_the_ones_that_must_load_alone_do() -> None:
    seen, both = _Loads(), threading.Barrier(2)
    loads = [_load(_Backend("a", seen, wait=both)), _load(_Backend("v1", seen), alone=True),
             _load(_Backend("b", seen, wait=both)), _load(_Backend("v2", seen), alone=True)]
    try:
        await load_models(loads)  # a and b each wait for the other: loaded one after the other, both would fail
        assert all(load.engine.state is EngineState.HEALTHY for load in loads)
        assert seen.beside["v1"] == seen.beside["v2"] == 0  # nothing else loaded meanwhile
    finally:
        await _stop(loads)


async def test_the_first_failure_names_its_model_and_cancels_the_rest() -> None:
    seen, release = _Loads(), threading.Event()
    slow = _load(_Backend("slow", seen, wait=release))
    broken = _load(_Backend("broken", seen, fail=True))
    later = _load(_Backend("later", seen), alone=True)
    try:
        with pytest.raises(ModelLoadError) as failed:
            await load_models([slow, broken, later])
        assert str(failed.value) == "broken (embed): config.json is unreadable" and failed.value.model == "broken"
        assert slow.engine.state is EngineState.UNHEALTHY and slow.engine.loading  # cancelled; its thread runs on
        assert "later" not in seen.beside  # never started
    finally:
        release.set()
        await _stop([slow, broken, later])


async def test_a_load_failure_reaches_the_app_as_one_fatal_error_naming_the_model() -> None:
    from embedding_service.api.app import create_app
    from embedding_service.api.served import Served

    seen = _Loads()
    good, bad = _load(_Backend("good", seen)), _load(_Backend("bad", seen, fail=True))
    fatal: list[BaseException] = []
    app = create_app(make_settings(engine="fake"), models=[Served("good", good.engine, "embed"),
                                                             Served("bad", bad.engine, "embed")],
                     on_fatal=fatal.append)
    async with app.router.lifespan_context(app):
        while not fatal:
            await asyncio.sleep(0.01)
    assert [str(exc) for exc in fatal] == ["bad (embed): config.json is unreadable"]


async def test_transformers_builds_take_turns_while_torch_loads_run_together(minilm_dir: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """from_pretrained changes process-wide state (torch's default dtype, PreTrainedModel.tie_weights): two
    builds at once could leave a model in the other's dtype, so they take turns (backends/base.py)."""
    import torch
    import transformers

    from embedding_service.backends.torch.embed import TorchBackend

    build, inside, most, count = transformers.AutoModel.from_pretrained, [0], [0], threading.Lock()

    def watched(*args: object, **kwargs: object) -> object:
        with count:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            threading.Event().wait(0.2)  # room for another build to begin meanwhile, were it allowed to
            return build(*args, **kwargs)
        finally:
            with count:
                inside[0] -= 1

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", watched)
    backends = {dtype: TorchBackend(backend_options(minilm_dir, dtype=dtype, device="cpu"))
                for dtype in ("float32", "bfloat16")}
    loads = [ModelLoad(dtype, "embed", EmbeddingEngine(backend, engine_options()))
             for dtype, backend in backends.items()]
    try:
        await load_models(loads)
        assert most[0] == 1
        assert {dtype: next(b._model.parameters()).dtype for dtype, b in backends.items()} == {
            "float32": torch.float32, "bfloat16": torch.bfloat16}
        assert torch.get_default_dtype() == torch.float32
    finally:
        await _stop(loads)


def test_vllm_and_compiled_torch_models_are_planned_to_load_alone(tmp_path: Path, minilm_dir: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - name: eager\n    model_path: {minilm_dir}\n    engine: torch\n"
                      f"  - name: compiled\n    model_path: {minilm_dir}\n    engine: torch\n    torch_compile: true\n"
                      f"  - name: ov\n    model_path: {minilm_dir}\n    engine: openvino\n"
                      f"  - name: vllm\n    model_path: {minilm_dir}\n    engine: vllm\n")
    plan = plan_service(make_settings(models_file=str(models)))
    assert {name: model.loads_alone for name, model in plan.models.items()} == {
        "eager": False, "compiled": True, "ov": False, "vllm": True}


# --- memory: what each model claims on its device ---------------------------------------------------------------

def _options(model_dir: Path, **settings: object) -> BackendOptions:
    return backend_options(model_dir, **settings)


def test_the_weights_are_counted_from_the_safetensors_headers(tmp_path: Path, minilm_dir: Path) -> None:
    from safetensors.numpy import load_file

    facts = read_model_facts(minilm_dir)
    tensors = load_file(str(minilm_dir / "model.safetensors"))
    assert facts.parameters == sum(t.size for t in tensors.values())
    both = tmp_path / "both"  # a folder with both formats: the engine loads one, the safetensors
    shutil.copytree(minilm_dir, both)
    (both / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    assert read_model_facts(both).weight_bytes == facts.weight_bytes
    (both / "model.safetensors").write_bytes(b"\xff" * 16)  # a header that cannot be read: sizes on disk
    assert read_model_facts(both).parameters is None and read_model_facts(both).weight_bytes == 16


def test_each_engine_claims_its_weights_in_its_dtype_on_its_device(minilm_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    params = read_model_facts(minilm_dir).parameters
    assert params
    fp32 = model_claim("m", "torch", _options(minilm_dir, dtype="float32", device="cpu"), None)
    assert fp32 == Claim("m", "cpu", 4 * params, "float32 weights")
    gpu = model_claim("m", "torch", _options(minilm_dir, dtype="float16", device="cuda"), 80 * GB)
    assert gpu == Claim("m", "cuda", 2 * params, "float16 weights")
    int8 = model_claim("m", "openvino", _options(minilm_dir, dtype="float32", quantize="int8"), 80 * GB)
    assert int8 == Claim("m", "cpu", params, "int8 weights")  # openvino runs on the CPU
    vllm_gpu = model_claim("m", "vllm", _options(minilm_dir, device="cuda", gpu_memory_utilization=0.5), 80 * GB)
    assert vllm_gpu == Claim("m", "cuda", 40 * GB, "gpu_memory_utilization 0.50 of the GPU")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    vllm_cpu = model_claim("m", "vllm", _options(minilm_dir, dtype="float32", device="cpu"), None)
    assert vllm_cpu == Claim("m", "cpu", 4 * params + 3 * GB, "float32 weights + 3.0 GB KV cache")
    assert model_claim("m", "fake", _options(minilm_dir, device="cuda"), 80 * GB) is None


def test_a_device_whose_claims_exceed_it_is_named_with_every_number() -> None:
    claims = [Claim("a", "cuda", 40 * GB, "gpu_memory_utilization 0.50 of the GPU"),
              Claim("b", "cuda", 48 * GB, "gpu_memory_utilization 0.60 of the GPU"),
              Claim("c", "cpu", 2 * GB, "bfloat16 weights")]
    assert memory_shortfall(claims, {"cuda": 88 * GB, "cpu": 2 * GB}) is None  # equal is a fit
    assert memory_shortfall(claims, {"cuda": None, "cpu": None}) is None  # unknown: never a reason to refuse
    assert memory_shortfall(claims, {"cuda": 80 * GB, "cpu": 1 * GB}) == (
        "the models do not fit in memory: on the GPU they take at least 88.0 GB (a: 40.0 GB (gpu_memory_utilization "
        "0.50 of the GPU), b: 48.0 GB (gpu_memory_utilization 0.60 of the GPU)) but the GPU has 80.0 GB; on the CPU "
        "they take at least 2.0 GB (c: 2.0 GB (bfloat16 weights)) but 1.0 GB of memory is available: serve fewer or "
        "smaller models, or give the server more memory")


def test_a_plan_sums_per_device_counts_each_worker_and_asks_the_gpu_only_when_used(minilm_dir: Path) -> None:
    params = read_model_facts(minilm_dir).parameters
    assert params
    asked: list[str] = []

    def gpu() -> int:
        asked.append("gpu")
        return 3 * params  # room for one fp16 copy, not two

    on_gpu = [(name, "torch", _options(minilm_dir, dtype="float16", device="cuda")) for name in ("x", "y")]
    line = plan_shortfall(on_gpu, gpu_total=gpu, cpu_available=lambda: None)
    assert line is not None and line.startswith("the models do not fit in memory: on the GPU they take at least ")
    assert "x: 43 MB (float16 weights), y: 43 MB (float16 weights)) but the GPU has 65 MB" in line
    on_cpu = [("x", "torch", _options(minilm_dir, dtype="float32", device="cpu"))]
    assert plan_shortfall(on_cpu, gpu_total=gpu, cpu_available=lambda: 5 * params) is None
    two = plan_shortfall(on_cpu, 2, gpu_total=gpu, cpu_available=lambda: 5 * params)
    assert two is not None and "x: 173 MB (float32 weights, x2 workers)" in two  # each worker loads a copy
    assert asked == ["gpu"]  # only the plan with a model on the GPU asked


def test_the_gpu_query_answers_none_without_a_gpu_and_obeys_the_test_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GPU_MEMORY_OVERRIDE_ENV, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_total_bytes() is None  # no GPU for this process, whatever the machine has
    monkeypatch.setenv(GPU_MEMORY_OVERRIDE_ENV, str(5 * GB))
    assert gpu_total_bytes() == 5 * GB


def test_available_memory_is_the_tighter_of_meminfo_and_the_cgroup(tmp_path: Path) -> None:
    meminfo, cgroup = tmp_path / "meminfo", tmp_path / "cgroup"
    meminfo.write_text("MemTotal: 8000000 kB\nMemAvailable: 4000000 kB\n")
    cgroup.mkdir()
    assert available_bytes(meminfo, cgroup) == 4000000 * 1024
    (cgroup / "memory.max").write_text("3000000000\n")
    (cgroup / "memory.current").write_text("1000000000\n")
    assert available_bytes(meminfo, cgroup) == 2_000_000_000  # the container's limit is the tighter one


# --- real processes: a refusal before loading, a failure while another model loads ------------------------------

def _serve(models: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str]:
    import os

    result = subprocess.run([sys.executable, "-m", "embedding_service", "serve", "--models-file", str(models),
                             "--host", "127.0.0.1", "--port", str(free_port()), *args], capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    return result.returncode, result.stderr


def test_a_start_whose_models_cannot_fit_stops_before_loading(tmp_path: Path, minilm_dir: Path) -> None:
    huge = tmp_path / "huge"
    shutil.copytree(minilm_dir, huge, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "onnx", "openvino"))
    with (huge / "model.safetensors").open("wb") as weights:  # sparse: 4 TiB apparent, nothing on disk
        weights.truncate(4 << 40)
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - name: small\n    demo: true\n    dtype: float32\n"
                      f"  - name: huge\n    model_path: {huge}\n")
    code, stderr = _serve(models, "--engine", "torch")
    assert code == 1
    assert stderr.strip().splitlines()[-1].startswith(
        "embedding-service: the models do not fit in memory: on the CPU they take at least 4096.1 GB (small: 87 MB "
        "(float32 weights), huge: 4096.0 GB (weight files)) but "), stderr
    assert "Traceback" not in stderr and "loading" not in stderr.lower()


def test_a_start_whose_models_cannot_fit_the_gpu_stops_before_loading(tmp_path: Path, minilm_dir: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - name: one\n    demo: true\n  - name: two\n    demo: true\n")
    code, stderr = _serve(models, "--engine", "torch", "--device", "cuda", "--dtype", "float16",
                          env={GPU_MEMORY_OVERRIDE_ENV: str(64 * MB)})  # a pretend GPU: nothing loads on it
    assert code == 1
    assert stderr.strip().splitlines()[-1] == (
        "embedding-service: the models do not fit in memory: on the GPU they take at least 87 MB (one: 43 MB "
        "(float16 weights), two: 43 MB (float16 weights)) but the GPU has 64 MB: serve fewer or smaller models, "
        "or give the server more memory"), stderr


def test_a_model_that_fails_while_another_loads_stops_the_start_with_one_line(tmp_path: Path,
                                                                              minilm_dir: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(minilm_dir, broken, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "onnx", "openvino"))
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - name: slow\n    model_name: slow\n    engine: fake\n"
                      f"  - name: broken\n    model_path: {broken}\n    engine: torch\n")
    # The fake model's load takes 10 minutes: the failure must not wait for it (the run's timeout would fail).
    code, stderr = _serve(models, "--fake-load-delay-ms", "600000", timeout=120)
    assert code == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("embedding-service: model load failed: broken (embed): "), stderr
    assert "Traceback" not in stderr
