"""Real servers with `--api-processes 2`: MiniLM's vectors byte for byte as one process gives them, load with no
errors, an API process killed and replaced, the engine's queue bound, a SIGTERM drain, and an engine death."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from bench.studies.api_processes import established_connections, wait_every_process_ready
from embedding_service.api.app import create_app
from embedding_service.api.served import Served
from embedding_service.service import build_engines, plan_service

from .conftest import ServerProcess, in_process_client, make_settings, missing, serving

pytestmark = pytest.mark.slow

TEXTS = ["The capital of China is Beijing.", "Gravity pulls apples down.", "zouza kei lou " * 20, "a"]
FAKE = ["--engine", "fake", "--log-level", "WARNING", "--api-processes", "2"]


QUERY, DOCS = "What is the capital of China?", ["Beijing is the capital of China.", "Gravity.", "China is in Asia."]


@pytest.fixture(scope="module")
def minilm_two(minilm_dir: Path, cross_encoder_dir: Path) -> Iterator[ServerProcess]:
    """MiniLM and a (random) cross-encoder, torch fp32, behind two API processes; without the result cache, so
    that a text sent again under load is computed again (batched with others), not the first answer's bytes."""
    yield from serving(["--engine", "torch", "--dtype", "float32", "--model-path", str(minilm_dir),
                        "--rerank-model-path", str(cross_encoder_dir), "--log-level", "WARNING",
                        "--api-processes", "2", "--result-cache-bytes", "0"])


def _api_processes(server: ServerProcess) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(server.proc.pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # (exited, not yet reaped)
            continue
    return found


def _wait_all_ready(url: str) -> None:
    wait_every_process_ready(url, timeout=60)


def _vectors(answer: httpx.Response) -> list[bytes]:
    assert answer.status_code == 200, answer.text
    return [base64.b64decode(item["embedding"]) for item in answer.json()["data"]]


async def _one_process_answers(minilm_dir: Path, cross_encoder_dir: Path) -> tuple[list[list[bytes]], list[Any]]:
    """What one process answers: the same app over engines built from the same settings, in this process."""
    settings = make_settings(engine="torch", dtype="float32", model_path=str(minilm_dir),
                             rerank_model_path=str(cross_encoder_dir))
    plan = plan_service(settings)
    engines = build_engines(plan)
    app = create_app(settings, models=[Served(name, engines[name], model.role) for name, model in plan.models.items()])
    vectors, ranks = [], []
    async with in_process_client(app) as http:
        for engine in engines.values():
            await engine.start()
        for text in TEXTS:  # one request at a time: each its own batch, in both servers
            vectors.append(_vectors(await http.post("/v1/embeddings", json={"input": [text],
                                                                            "encoding_format": "base64"})))
        for top in (1, 3):
            ranks.append((await http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": top})
                          ).json()["results"])
        for engine in engines.values():
            await engine.stop()
    return vectors, ranks


def test_vectors_and_scores_are_byte_for_byte_those_of_one_process(minilm_two: ServerProcess, minilm_dir: Path,
                                                                    cross_encoder_dir: Path) -> None:
    want_vectors, want_ranks = asyncio.run(_one_process_answers(minilm_dir, cross_encoder_dir))
    _wait_all_ready(minilm_two.url)
    for _ in range(2):  # new connections: both API processes answer some
        got = [_vectors(httpx.post(minilm_two.url + "/v1/embeddings", headers={"Connection": "close"},
                                   json={"input": [text], "encoding_format": "base64"})) for text in TEXTS]
        assert got == want_vectors
        ranks = [httpx.post(minilm_two.url + "/v1/rerank", headers={"Connection": "close"},
                            json={"query": QUERY, "documents": DOCS, "top_n": top}).json()["results"]
                 for top in (1, 3)]
        assert ranks == want_ranks  # (scores as JSON floats: float32 printed exactly)


def test_concurrent_load_has_no_errors_and_the_same_vectors(minilm_two: ServerProcess) -> None:
    alone = {text: np.frombuffer(_vectors(httpx.post(minilm_two.url + "/v1/embeddings", json={
        "input": [text], "encoding_format": "base64"}))[0], dtype=np.float32) for text in TEXTS}

    async def load() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=minilm_two.url, timeout=60, limits=limits) as http:
            return await asyncio.gather(*(http.post("/v1/embeddings", json={
                "input": [TEXTS[n % len(TEXTS)]], "encoding_format": "base64"}) for n in range(96)))

    answers = asyncio.run(load())
    for n, answer in enumerate(answers):
        got = np.frombuffer(_vectors(answer)[0], dtype=np.float32)
        # (batched with others: padding changes the matmul shapes, so last bits may differ)
        np.testing.assert_allclose(got, alone[TEXTS[n % len(TEXTS)]], rtol=0, atol=1e-5)


def test_a_killed_api_process_is_replaced(minilm_two: ServerProcess) -> None:
    before = _api_processes(minilm_two)
    assert len(before) == 2
    before[0].kill()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = _api_processes(minilm_two)
        if len(now) == 2 and before[0].pid not in {p.pid for p in now}:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"no new API process:\n{minilm_two.log()}")
    _wait_all_ready(minilm_two.url)
    for _ in range(10):
        answer = httpx.post(minilm_two.url + "/v1/embeddings", json={"input": "after"},
                            headers={"Connection": "close"})
        assert answer.status_code == 200
    assert "exited with -9: starting another" in minilm_two.log()


def _sample(scrape: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines() if line.startswith(prefix))


def test_the_queue_bound_and_metrics_span_api_processes_and_sigterm_drains_them(
        server_factory: type[ServerProcess]) -> None:
    server = server_factory([*FAKE, "--fake-delay-ms", "300", "--max-queue-requests", "2", "--max-batch-size", "1",
                             "--shutdown-timeout", "5"])
    server.wait_healthy(60)
    _wait_all_ready(server.url)

    async def send(http: httpx.AsyncClient, count: int) -> list[asyncio.Future[httpx.Response]]:
        return [asyncio.ensure_future(http.post("/v1/embeddings", json={"input": f"t {n}"},
                                                headers={"Connection": "close"})) for n in range(count)]

    async def scenario() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            burst = [r.status_code for r in await asyncio.gather(*await send(http, 8))]
            for _ in range(4):  # one view, whichever API process answers the scrape
                scrape = (await http.get("/metrics", headers={"Connection": "close"})).text
                assert _sample(scrape, 'embedding_requests_total{method="POST",route="/v1/embeddings",status="200"}') \
                    == burst.count(200)
                assert _sample(scrape, 'embedding_requests_total{method="POST",route="/v1/embeddings",status="503"}') \
                    == burst.count(503)
                assert _sample(scrape, "embedding_texts_total{") == burst.count(200)  # (the engine process's)
            inflight = await send(http, 2)  # (the queue's bound: both accepted)
            await asyncio.sleep(0.2)
            server.proc.send_signal(signal.SIGTERM)
            return burst, [r.status_code for r in await asyncio.gather(*inflight)]

    burst, drained = asyncio.run(scenario())
    assert set(burst) == {200, 503} and burst.count(200) >= 2, burst  # one queue, whichever process took them
    assert drained == [200, 200]  # accepted before SIGTERM: served
    assert server.proc.wait(20) == 0, server.log()


def test_an_engine_death_answers_503_and_stops_the_server(server_factory: type[ServerProcess]) -> None:
    server = server_factory([*FAKE, "--fake-die-after", "1"])
    server.wait_healthy(60)
    _wait_all_ready(server.url)
    assert httpx.post(server.url + "/v1/embeddings", json={"input": "first"}).status_code == 200
    died = httpx.post(server.url + "/v1/embeddings", json={"input": "second"})
    assert died.status_code == 503 and died.json()["error"]["code"] == "engine_unhealthy"
    assert server.proc.wait(30) == 1
    assert "engine died" in server.log()


def _listeners(proc: psutil.Process, port: int) -> set[str]:
    """The sockets `proc` listens on `port` with, by inode ("socket:[N]")."""
    fds = {c.fd for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    return {os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in fds}


@pytest.mark.parametrize("processes", [["--api-processes", "2"], ["--workers", "2"]], ids=["api-processes", "workers"])
def test_each_process_has_its_own_listener_and_wrks_connections_are_spread(server_factory: type[ServerProcess],
                                                                           processes: list[str]) -> None:
    """One shared listener gave a burst of connections to whichever process accepted first (wrk's 64 under the
    bench: 4 and 60, 9 and 55), so one core served nearly everything. Each process has a listener of its own,
    in one SO_REUSEPORT group, and the kernel spreads connections by address: wrk's 64 land on both (binomial:
    fewer than 16 of 64 on one side has p = 5e-5)."""
    if shutil.which("wrk") is None:
        missing("wrk is missing (.ci/run installs it)", "wrk is not installed (apt-get install wrk)")
    server = server_factory([*FAKE[:-2], *processes])
    server.wait_healthy(60)
    _wait_all_ready(server.url)
    port = int(server.url.rsplit(":", 1)[1])
    procs = _api_processes(server)
    listeners = [_listeners(proc, port) for proc in procs]
    assert len(listeners) == 2 and all(len(mine) == 1 for mine in listeners) and listeners[0] != listeners[1], \
        listeners
    wrk = subprocess.Popen(["wrk", "-t", "1", "-c", "64", "-d", "3s", server.url + "/health"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        held = sorted(established_connections(proc, port) for proc in procs)
    finally:
        wrk.wait(10)
    assert sum(held) == 64 and held[0] >= 16, held
