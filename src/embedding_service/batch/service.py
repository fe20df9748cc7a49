"""Mount the Files and Batch APIs on the app: the store, the routes, and the runner inside the app's lifespan.

Without `data_dir` nothing is stored: the routes exist only to say how to turn the API on (404, in the
OpenAI envelope), so a client learns why rather than meeting a bare "no route".
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI

from ..config import EmbeddingConfig
from ..errors import ErrorKind, ServiceError
from .disk import Disk
from .invoke import Invoker
from .lines import line_limit
from .metrics import BatchCollector
from .routes import build_batch_router
from .runner import BatchRunner, RunnerOptions
from .store import Store

__all__ = ["BatchApi", "mount_batch_api"]

log = logging.getLogger("embedding_service")

_DB_NAME = "batch.sqlite3"


@dataclass
class BatchApi:
    store: Store
    disk: Disk
    runner: BatchRunner


def mount_batch_api(app: FastAPI, settings: EmbeddingConfig) -> BatchApi | None:
    """Add /v1/files and /v1/batches to `app`; the runner starts and stops with the app's lifespan."""
    if not settings.data_dir:
        app.include_router(_disabled_router())
        return None
    root = Path(settings.data_dir).expanduser()
    disk = Disk(root)  # (raises RuntimeError when another process has the folder)
    store = Store.open(root / _DB_NAME)
    # Before anything is served: an upload in progress would be a stray file too.
    removed = disk.sweep(store.call_blocking(store.known_names))
    if removed:
        log.info("batch store: removed %d unreferenced file(s) left by an interrupted write", removed)
    retention_s = settings.batch_retention_days * 86_400

    runner = BatchRunner(store, disk, Invoker(app), RunnerOptions(
        max_lines=settings.batch_max_lines, max_line_bytes=line_limit(settings.max_body_bytes),
        max_stored_bytes=settings.batch_max_stored_bytes, retention_s=retention_s,
        concurrency=settings.batch_concurrency))
    app.include_router(build_batch_router(store, disk, runner, max_file_bytes=settings.batch_max_file_bytes,
                                          max_stored_bytes=settings.batch_max_stored_bytes, retention_s=retention_s))
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(the_app: Any) -> AsyncIterator[Any]:
        async with inner(the_app) as state:
            metrics = getattr(app.state, "metrics", None)  # (the app's registry exists once create_app is done)
            if metrics is not None:
                metrics.registry.register(BatchCollector(runner.stats))
            runner.start()
            try:
                yield state
            finally:
                await runner.stop()  # first: its lines in flight are dropped, redone after the restart
                store.close()
                disk.close()

    app.router.lifespan_context = lifespan
    log.info("Batch API on: data in %s", root)
    api = BatchApi(store, disk, runner)
    app.state.batch_api = api
    return api


def _disabled_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    async def disabled() -> None:
        raise ServiceError(ErrorKind.NOT_FOUND, "the Files and Batch APIs are off on this server: start it with "
                           "--data-dir DIR (or EMBEDDING_DATA_DIR) to turn them on", code="batch_api_disabled")

    for path in ("/v1/files", "/v1/files/{rest:path}", "/v1/batches", "/v1/batches/{rest:path}"):
        router.add_api_route(path, disabled, methods=["GET", "POST", "DELETE"])
    return router
