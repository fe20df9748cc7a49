"""Where `embed --batch-file` sends its lines: the server's own app in this process, running servers (`--url`,
one or several), or Ray actors each holding the app (`--ray`).

Each answers a line with exactly what the endpoint answers a client posting that body (status, JSON body,
content type), so the output equals the server Batch API's: in process and on Ray a line enters the app as the
Batch API's lines do (batch/invoke.py: below the API-key layer, the same parsing, limits and error envelope);
over HTTP it is posted to the line's `url` on a server. Overload answers (429, 503; over HTTP also timeouts,
refused connections, 408, 502, 504) are retried; when they persist the job stops, and a rerun resumes it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..batch.objects import RETRY_STATUSES, Answer
from ..config import EmbeddingConfig
from .remote import Pending, ServerPool

if TYPE_CHECKING:
    from ..batch.invoke import Invoker

__all__ = ["InProcessApp", "LineSender", "RayLines", "ServerLines", "choose_sender"]

log = logging.getLogger("embedding_service")

Lines = list[tuple[bytes, str]]  # (the request body, its request id) of each line of a chunk

_HTTP_RETRY = {408, 429, 502, 503, 504}  # (a 500 is the line's answer, as in the server's Batch API)


class LineSender(Protocol):
    depth: int  # chunks in flight

    def fingerprint(self) -> dict[str, Any]: ...
    async def start(self) -> None: ...
    async def answer(self, path: str, lines: Lines) -> list[Answer]: ...
    async def close(self) -> None: ...


class InProcessApp:
    """The app `serve` would run, without its HTTP server (and without a Batch API of its own)."""

    depth = 2

    def __init__(self, settings: EmbeddingConfig, *, concurrency: int, retries: int = 8) -> None:
        from ..service import onednn_cache_for, openmp_waits_for, plan_service

        self.settings = settings.model_copy(update={"data_dir": None, "workers": 1, "api_processes": 1})
        self.plan = plan_service(self.settings)  # each model's folder and engine, decided once
        # As `serve`, before torch loads: the app's event loop and tokenizer thread share the CPUs with the
        # model's OpenMP team (which must not spin on them), and oneDNN's kernel cache stays bounded.
        engines = [model.engine for model in self.plan.models.values()]
        os.environ.update({**openmp_waits_for(engines), **onednn_cache_for(engines)})
        self.concurrency, self.retries = concurrency, retries
        self._invoker: Invoker | None = None
        self._lifespan: Any = None

    def fingerprint(self) -> dict[str, Any]:
        s = self.settings
        models = {name: [m.role, m.model_dir or None, m.engine] for name, m in self.plan.models.items()}
        return {"mode": "in-process", "models": models, "dtype": s.dtype, "device": s.device,
                "max_model_len": s.max_model_len, "truncate": s.truncate}

    async def start(self) -> None:
        from ..api.app import create_app
        from ..api.served import Served
        from ..batch.invoke import Invoker
        from ..service import build_engines

        engines = build_engines(self.plan)
        models = [Served(name, engines[name], m.role, m.aliases) for name, m in self.plan.models.items()]
        failures: list[BaseException] = []
        app = create_app(self.settings, models=models, on_fatal=failures.append, load_before_serving=True)
        self._lifespan = app.router.lifespan_context(app)
        await self._lifespan.__aenter__()  # loads every model before the first line
        if failures:
            await self.close()
            raise RuntimeError(f"model load failed: {failures[0]}")
        app.middleware_stack = app.build_middleware_stack()  # (built at a server's first event; no server here)
        self._invoker = Invoker(app)

    async def answer(self, path: str, lines: Lines) -> list[Answer]:
        gate = asyncio.Semaphore(self.concurrency)
        return list(await asyncio.gather(*(self._one(path, body, request_id, gate) for body, request_id in lines)))

    async def _one(self, path: str, body: bytes, request_id: str, gate: asyncio.Semaphore) -> Answer:
        assert self._invoker is not None
        async with gate:
            for attempt in range(self.retries + 1):
                answer = await self._invoker.post(path, body, owner="", request_id=request_id)
                if answer.status not in RETRY_STATUSES:
                    return answer
                await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
        raise RuntimeError(f"{path} answered {answer.status} {self.retries + 1} times: "
                           f"{answer.body[:200].decode('utf-8', 'replace')}")

    async def close(self) -> None:
        if self._lifespan is not None:
            lifespan, self._lifespan = self._lifespan, None
            await lifespan.__aexit__(None, None, None)


@dataclass(kw_only=True)
class _Line(Pending):
    path: str
    body: bytes
    request_id: str


class ServerLines(ServerPool):
    """Lines posted to running servers; every server's `concurrency` workers pull from one queue."""

    depth = 2

    def __init__(self, urls: list[str], **options: Any) -> None:
        # A server's OpenAI base (…/v1), given with or without the /v1: a line's url is a path from the root.
        super().__init__([url.rstrip("/").removesuffix("/v1") + "/v1" for url in urls], **options)

    def fingerprint(self) -> dict[str, Any]:
        return {"mode": "http", "model": self.served_models()}

    async def answer(self, path: str, lines: Lines) -> list[Answer]:
        loop = asyncio.get_running_loop()
        pending = [_Line(path=path, body=body, request_id=request_id, future=loop.create_future())
                   for body, request_id in lines]
        for line in pending:
            self._queue.put_nowait(line)
        return list(await asyncio.gather(*(line.future for line in pending)))

    async def _post(self, url: str, line: _Line) -> Answer | None:
        import httpx

        root = url.removesuffix("/v1")
        try:
            response = await self._client.post(root + line.path, content=line.body, headers={
                "content-type": "application/json", "x-request-id": line.request_id})
        except httpx.HTTPError as exc:  # connection refused/reset, timeouts
            self._retry_or_fail(line, f"{url}: {type(exc).__name__}: {exc}")
            return None
        if response.status_code in _HTTP_RETRY:
            line.retry_after = response.headers.get("retry-after")
            self._retry_or_fail(line, f"{url} answered {response.status_code}: {response.text[:300]}")
            return None
        return Answer(response.status_code, response.content, response.headers.get("content-type", ""))


class _LineActor:
    """A Ray actor: the app in the actor's process, answering one chunk of lines per call."""

    def __init__(self, settings_json: str, concurrency: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.app = InProcessApp(EmbeddingConfig.model_validate_json(settings_json), concurrency=concurrency)
        self.loop.run_until_complete(self.app.start())

    def answer(self, path: str, lines: Lines) -> list[Answer]:
        return self.loop.run_until_complete(self.app.answer(path, lines))


class RayLines:
    """Chunks of lines spread over `actors` Ray actors (each given its next chunk while it runs one)."""

    def __init__(self, settings: EmbeddingConfig, options: Any, *, concurrency: int) -> None:
        self.settings, self.options, self.concurrency = settings, options, concurrency  # options: RayOptions
        self.depth = 2 * options.actors
        self._ray: Any = None
        self._free: asyncio.Queue[Any] = asyncio.Queue()

    def fingerprint(self) -> dict[str, Any]:
        from .local import EmbedOptions
        from .ray_runner import ray_fingerprint

        return {**ray_fingerprint(self.settings, EmbedOptions()), "models_file": self.settings.models_file}

    async def start(self) -> None:
        from .ray_runner import start_ray

        self._ray = start_ray(self.options.address)
        resources = {"num_cpus": self.options.cpus_per_actor}
        if self.options.gpus_per_actor:
            resources["num_gpus"] = self.options.gpus_per_actor
        actor = self._ray.remote(**resources)(_LineActor)
        settings_json = self.settings.model_dump_json()
        for _ in range(self.options.actors):
            handle = actor.remote(settings_json, self.concurrency)
            self._free.put_nowait(handle)
            self._free.put_nowait(handle)  # twice: its next chunk waits in Ray, not here

    async def answer(self, path: str, lines: Lines) -> list[Answer]:
        handle = await self._free.get()
        try:
            return list(await handle.answer.remote(path, lines))
        finally:
            self._free.put_nowait(handle)

    async def close(self) -> None:
        if self._ray is not None:
            self._ray.shutdown()


def choose_sender(settings: EmbeddingConfig, *, urls: list[str], ray_options: Any, api_key: str | None,
                  concurrency: int, retries: int, timeout_s: float) -> LineSender:
    if ray_options is not None:
        return RayLines(settings, ray_options, concurrency=concurrency)
    if urls:
        return ServerLines(urls, api_key=api_key, concurrency=concurrency, retries=retries, timeout_s=timeout_s)
    return InProcessApp(settings, concurrency=concurrency, retries=retries)

