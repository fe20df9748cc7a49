"""Once its models are loaded, `serve` freezes the start-up heap (server.freeze_startup_heap, via on_loaded)."""

from __future__ import annotations

import asyncio
import gc

from embedding_service.api.app import create_app
from embedding_service.backends.base import BackendInfo
from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.engine.engine import EmbeddingEngine
from embedding_service.engine.types import EngineState
from embedding_service.server import freeze_startup_heap

from .conftest import engine_options, make_settings


async def _run_lifespan(backend: FakeBackend) -> tuple[list[EngineState], list[BaseException]]:
    engine = EmbeddingEngine(backend, engine_options(max_model_len=64))
    loaded: list[EngineState] = []
    fatal: list[BaseException] = []
    app = create_app(make_settings(engine="fake", served_model_name="m"), engine,
                     on_fatal=fatal.append, on_loaded=lambda: loaded.append(engine.state))
    async with app.router.lifespan_context(app):
        for _ in range(200):
            if loaded or fatal:
                break
            await asyncio.sleep(0.01)
    return loaded, fatal


async def test_on_loaded_runs_once_the_engines_serve() -> None:
    loaded, fatal = await _run_lifespan(FakeBackend(dimension=8, max_model_len=64))
    assert loaded == [EngineState.HEALTHY] and not fatal


async def test_on_loaded_does_not_run_when_the_load_fails() -> None:
    class Broken(FakeBackend):
        def load(self) -> BackendInfo:
            raise RuntimeError("no such model")

    loaded, fatal = await _run_lifespan(Broken(dimension=8, max_model_len=64))
    assert not loaded and len(fatal) == 1


def test_freeze_startup_heap_moves_what_is_alive_out_of_the_collectors_sight() -> None:
    assert gc.get_freeze_count() == 0
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 10_000  # (pytest, the app's frameworks, numpy...)
    finally:
        gc.unfreeze()
