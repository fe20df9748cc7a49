"""deploy/Dockerfile.cpu, built and run for real: `pytest -m docker` (CI: .ci/run, as root).

A private dockerd (tests/docker_support.py) builds the CPU image offline, from a Debian base made with
debootstrap and a wheelhouse, with no network. Then: the image serves what the same server serves outside the
container (same packages, --dtype float32: equal vectors), as uid 10001 on a read-only root file system with a
read-only model folder; its tracing and redis extras work; `docker stop` under load drains and exits 0; two
containers behind the shipped nginx config lose no request when one is killed. Skips, with the reason, where
no private daemon can start.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from .conftest import ROOT, ServerProcess, free_port, missing
from .docker_support import (
    BASE_TAG,
    IMAGE_TAG,
    BuildReport,
    Container,
    DockerDaemon,
    DockerUnavailable,
    build_cpu_image,
    private_daemon,
)
from .test_nginx_failover import Nginx, Traffic, nginx_binary, site_config
from .test_result_cache_redis import REDIS_SERVER, RedisServer
from .test_tracing import SERVER_KIND, Receiver

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(2400)]

TEXTS = ["Hello, world!", "The quick brown fox jumps over the lazy dog.", "短い日本語の文です。",
         "embeddings " * 60, "a", "Given a web search query, retrieve relevant passages"]
# The result cache off: each answer computed (a cached single text would be its batch's bytes, not its own).
SAME_SETTINGS = {"EMBEDDING_ENGINE": "torch", "EMBEDDING_DTYPE": "float32", "EMBEDDING_RESULT_CACHE_BYTES": "0"}
MODEL_MOUNT = "/models/all-MiniLM-L6-v2"
LOCKED_DOWN = ["--read-only", "--tmpfs", "/tmp", "--tmpfs", "/home/app/.cache"]
STOP_TIMEOUT = 30
PREPARED_TAG = "embedding-service:prepared-test"
CLIENTS = 16  # during `docker stop`
SHUTDOWN_TIMEOUT = 20


def vectors(url: str, texts: list[str]) -> list[list[float]]:
    response = httpx.post(url + "/v1/embeddings", json={"input": texts}, timeout=120)
    assert response.status_code == 200, response.text
    return [item["embedding"] for item in response.json()["data"]]


@pytest.fixture(scope="module")
def docker() -> Iterator[DockerDaemon]:
    yield from private_daemon()


@pytest.fixture(scope="module")
def image(docker: DockerDaemon, request: pytest.FixtureRequest) -> BuildReport:
    try:
        report = build_cpu_image(docker)
    except DockerUnavailable as exc:
        pytest.skip(f"cannot build the image here: {exc}")
    terminal = request.config.pluginmanager.getplugin("terminalreporter")
    for line in report.summary():
        print(line)
        if terminal is not None:
            terminal.write_line(line)
    return report


@pytest.fixture(scope="module")
def reference(minilm_dir: Path) -> dict[str, list[list[float]]]:
    """The same server outside the container (the test's own venv, same engine and dtype): TEXTS as one
    batch, and each text on its own (a batch's padding changes the float rounding a little)."""
    server = ServerProcess(["--demo", "--engine", "torch", "--dtype", "float32", "--result-cache-bytes", "0"])
    try:
        server.wait_healthy(300)
        return {"batch": vectors(server.url, TEXTS), "single": [vectors(server.url, [t])[0] for t in TEXTS]}
    finally:
        server.stop()


@pytest.fixture
def model_mount(minilm_dir: Path) -> list[str]:
    return ["-v", f"{minilm_dir}:{MODEL_MOUNT}:ro", "-e", f"EMBEDDING_MODEL_PATH={MODEL_MOUNT}"]


def assert_clean_logs(container: Container) -> None:
    logs = container.logs()
    assert "Traceback" not in logs, logs[-6000:]


def test_image_serves_the_same_vectors_locked_down(docker: DockerDaemon, image: BuildReport,
                                                   reference: dict[str, list[list[float]]],
                                                   model_mount: list[str]) -> None:
    demo = Container(docker, free_port(), {"EMBEDDING_DEMO": "true", **SAME_SETTINGS}, LOCKED_DOWN)
    mounted = Container(docker, free_port(), SAME_SETTINGS, [*LOCKED_DOWN, *model_mount])
    healthy_after = [container.wait_healthy() for container in (demo, mounted)]
    print(f"\ndocker: healthy after {healthy_after[0]:.1f} s and {healthy_after[1]:.1f} s")

    # The spec's quick-start checks, as its curl commands send them.
    health = httpx.get(demo.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "healthy", health.text
    assert health.json()["device"] == "cpu" and health.json()["dtype"] == "float32"
    spec = httpx.post(demo.url + "/v1/embeddings", content=b'{"input": ["Hello, world!"]}',
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert spec.status_code == 200, spec.text
    body = orjson.loads(spec.content)
    assert body["object"] == "list" and body["data"][0]["index"] == 0 and len(body["data"][0]["embedding"]) == 384
    assert body["usage"]["prompt_tokens"] > 0

    # Exactly the vectors of the same server outside the container, from the bundled and the mounted model.
    for container in (demo, mounted):
        for got, expected in ((vectors(container.url, TEXTS), reference["batch"]),
                              ([vectors(container.url, [text])[0] for text in TEXTS], reference["single"])):
            worst = float(np.max(np.abs(np.asarray(got) - np.asarray(expected))))
            assert got == expected, f"{container.url}: vectors differ from the host's, max |diff| {worst:.3g}"

    for container in (demo, mounted):
        config = container.inspect()
        assert config["Config"]["User"] == "10001:10001"  # type: ignore[index]
        assert config["HostConfig"]["ReadonlyRootfs"] is True  # type: ignore[index]
        status = docker.run("exec", container.id, "cat", "/proc/1/status").stdout
        assert re.search(r"^Uid:\s+10001\s+10001", status, re.MULTILINE), status
        mounts = [f"{MODEL_MOUNT}/x"] if container is mounted else []
        for path in ["/opt/venv/x", "/home/app/x", *mounts]:  # nothing writable but the tmpfs
            touched = docker.run("exec", container.id, "touch", path, check=False)
            assert touched.returncode != 0 and "Read-only file system" in touched.stderr, (path, touched)
        assert docker.run("exec", container.id, "touch", "/home/app/.cache/x", check=False).returncode == 0
        assert_clean_logs(container)


def test_image_traces_and_caches_in_redis(docker: DockerDaemon, image: BuildReport, tmp_path: Path) -> None:
    """The image's tracing and redis extras: a container exports its request's spans to an OTLP receiver here
    and stores its vectors in a redis-server here (host network)."""
    if REDIS_SERVER is None:
        missing("redis-server is not installed (.ci/run installs it)", "redis-server is not installed")
    redis_server, receiver = RedisServer(tmp_path), Receiver()
    try:
        settings = {"EMBEDDING_DEMO": "true", "EMBEDDING_OTLP_ENDPOINT": receiver.url,
                    "EMBEDDING_RESULT_CACHE_REDIS": redis_server.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        container = Container(docker, free_port(), settings, LOCKED_DOWN)
        container.wait_healthy()
        vectors(container.url, ["traced, and cached in redis"])
        spans = receiver.wait_for(lambda got: any(span.kind == SERVER_KIND for span in got))
        deadline = time.monotonic() + 20
        while not redis_server.client.dbsize() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert redis_server.client.dbsize() > 0, container.logs()[-3000:]
        assert "POST /v1/embeddings" in [span.name for span in spans]
        assert_clean_logs(container)
    finally:
        receiver.server.shutdown()
        redis_server.stop()


@pytest.fixture
def cache_volume(docker: DockerDaemon) -> Iterator[str]:
    """A named volume on the image's cache folder, as docs/docker.md and docker-compose.yml use one."""
    name = f"es-cache-{free_port()}"
    docker.run("volume", "create", name)
    yield name
    docker.run("volume", "rm", "-f", name, check=False)


def resident_mb(docker: DockerDaemon, container: Container) -> float:
    status = docker.run("exec", container.id, "cat", "/proc/1/status").stdout
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) / 1024


@pytest.fixture(scope="module")
def openvino_reference(tmp_path_factory: pytest.TempPathFactory) -> list[list[float]]:
    """TEXTS from the openvino engine outside the container (the test's venv, --dtype float32)."""
    cache = tmp_path_factory.mktemp("openvino")
    server = ServerProcess(["--demo", "--engine", "openvino", "--dtype", "float32"],
                           env={"EMBEDDING_OPENVINO_CACHE_DIR": str(cache)})
    try:
        server.wait_healthy(300)
        return vectors(server.url, TEXTS)
    finally:
        server.stop()


def assert_same_vectors(got: list[list[float]], expected: list[list[float]]) -> str:
    """cos >= 0.99999 (the same IR and CPU give equal vectors: measured max |diff| 0); returns max |diff|."""
    worst = float(np.max(np.abs(np.asarray(got) - np.asarray(expected))))
    cosines = np.sum(np.asarray(got) * np.asarray(expected), axis=1)
    assert float(cosines.min()) >= 0.99999, f"cos {cosines.min()}, max |diff| {worst:.3g}"
    return f"{worst:.2g}"


def test_openvino_engine_in_the_image(docker: DockerDaemon, image: BuildReport, cache_volume: str,
                                      openvino_reference: list[list[float]]) -> None:
    """The image's openvino engine: the host's vectors (same packages, fp32); the export kept in a new named
    volume (which the app user must be able to write) makes the next start skip torch and transformers;
    `--quantize int8` exports and serves."""
    expected = openvino_reference

    settings = {"EMBEDDING_DEMO": "true", "EMBEDDING_ENGINE": "openvino", "EMBEDDING_DTYPE": "float32"}
    locked = ["--read-only", "--tmpfs", "/tmp", "-v", f"{cache_volume}:/home/app/.cache/embedding-service"]
    seen: dict[str, object] = {}
    for start in ("export", "cached"):
        container = Container(docker, free_port(), settings, locked)
        seen[f"{start} healthy s"] = round(container.wait_healthy(), 1)
        seen[f"{start} max |diff|"] = assert_same_vectors(vectors(container.url, TEXTS), expected)
        seen[f"{start} RSS MB"] = round(resident_mb(docker, container))
        maps = docker.run("exec", container.id, "cat", "/proc/1/maps").stdout
        logs = container.logs()
        assert_clean_logs(container)
        if start == "export":
            assert "openvino: exporting" in logs, logs[-3000:]
        else:  # the saved export and tokenizer: no torch, no transformers
            assert "openvino: using the exported model" in logs and "transformers not loaded" in logs, logs[-3000:]
            assert "libtorch" not in maps, "torch is loaded in a start from the export cache"
        docker.run("stop", "-t", str(STOP_TIMEOUT), container.id, timeout=120)

    int8 = Container(docker, free_port(), {"EMBEDDING_DEMO": "true", "EMBEDDING_QUANTIZE": "int8",
                                           "EMBEDDING_DTYPE": "float32"}, locked)
    seen["int8 healthy s"] = round(int8.wait_healthy(), 1)
    health = httpx.get(int8.url + "/health", timeout=10).json()
    cosines = np.sum(np.asarray(vectors(int8.url, TEXTS)) * np.asarray(expected), axis=1)
    seen["int8 min cos"] = round(float(cosines.min()), 4)
    assert float(cosines.min()) >= 0.99, cosines  # docs/openvino.md: min 0.9984 over 1,000 texts
    assert "quantize=int8" in int8.logs(), int8.logs()[-3000:]
    assert_clean_logs(int8)
    print(f"\ndocker openvino: {seen}, health {health}")


def test_prepared_image_starts_without_converting(docker: DockerDaemon, image: BuildReport, minilm_dir: Path,
                                                  openvino_reference: list[list[float]], tmp_path: Path) -> None:
    """deploy/Dockerfile.prepared: the model and its export baked in by `embedding-service prepare` at build
    time, in an image without torch, transformers or NNCF; a locked-down container serves the host's vectors
    at once."""
    context = tmp_path / "context"
    shutil.copytree(minilm_dir, context / "minilm")
    started = time.monotonic()
    docker.run("build", "--network", "none", "-f", str(ROOT / "deploy" / "Dockerfile.prepared"),
               "--build-arg", f"BASE_IMAGE={IMAGE_TAG}", "--build-arg", f"RUNTIME_BASE={BASE_TAG}",
               "--build-arg", "MODEL_DIR=minilm", "-t", PREPARED_TAG, str(context), timeout=900)
    built_s = time.monotonic() - started
    size = int(orjson.loads(docker.run("image", "inspect", PREPARED_TAG).stdout)[0]["Size"])
    assert size < image.image_bytes / 2, (size, image.image_bytes)  # the conversion libraries are gone
    listed = docker.run("run", "--rm", "--entrypoint", "python", PREPARED_TAG, "-c",
                        "import importlib.util as u; print([n for n in ('torch', 'transformers', 'nncf') "
                        "if u.find_spec(n)])").stdout.strip()
    assert listed == "[]", listed
    container = Container(docker, free_port(), {"EMBEDDING_DTYPE": "float32"}, LOCKED_DOWN, image=PREPARED_TAG)
    healthy_s = container.wait_healthy()
    worst = assert_same_vectors(vectors(container.url, TEXTS), openvino_reference)
    logs = container.logs()
    assert "openvino: using the exported model in /opt/openvino-export" in logs, logs[-3000:]
    assert "openvino: exporting" not in logs and "transformers not loaded" in logs, logs[-3000:]
    assert "libtorch" not in docker.run("exec", container.id, "cat", "/proc/1/maps").stdout
    assert_clean_logs(container)
    print(f"\ndocker prepared: built in {built_s:.0f} s, {size / 2**20:.0f} MiB (CPU image "
          f"{image.image_bytes / 2**20:.0f} MiB), healthy after {healthy_s:.1f} s, "
          f"RSS {resident_mb(docker, container):.0f} MB, max |diff| {worst}")


async def stop_under_load(url: str, clients: int, stopped: asyncio.Event, expected: dict[str, list[float]],
                          statuses: list[int]) -> list[tuple[str, float]]:
    """Closed-loop clients until the stop began and the server is gone; answers are checked as they come
    (closely, not exactly: the server batches concurrent requests together, and padding moves rounding)."""
    errors: list[tuple[str, float]] = []  # (kind, monotonic time)
    texts = list(expected)

    async def client(number: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for index in range(10_000):  # bounded; ends when the server is gone
                text = texts[(number + index) % len(texts)]
                try:
                    response = await http.post("/v1/embeddings", json={"input": text})
                except httpx.TransportError as exc:
                    errors.append((type(exc).__name__, time.monotonic()))
                    if stopped.is_set():
                        return
                    continue
                statuses.append(response.status_code)
                if response.status_code == 200:
                    np.testing.assert_allclose(response.json()["data"][0]["embedding"], expected[text],
                                               rtol=1e-4, atol=1e-5)
                else:
                    assert response.status_code == 503, response.text
                    assert response.json()["error"]["code"] == "shutting_down", response.text
                    assert response.headers.get("retry-after"), response.headers
                    await asyncio.sleep(0.02)

    await asyncio.gather(*(client(n) for n in range(clients)))
    return errors


def test_docker_stop_drains_sixteen_clients_and_exits_zero(docker: DockerDaemon, image: BuildReport,
                                                           reference: dict[str, list[list[float]]],
                                                           model_mount: list[str]) -> None:
    # DEBUG: uvicorn's access log, which shows every request the server read.
    env = {**SAME_SETTINGS, "EMBEDDING_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT), "EMBEDDING_LOG_LEVEL": "DEBUG"}
    container = Container(docker, free_port(), env, [*LOCKED_DOWN, *model_mount])
    container.wait_healthy()
    timing: dict[str, float] = {}

    statuses: list[int] = []

    async def scenario() -> list[tuple[str, float]]:
        stopped = asyncio.Event()
        expected = dict(zip(TEXTS, reference["single"], strict=True))
        load = asyncio.ensure_future(stop_under_load(container.url, CLIENTS, stopped, expected, statuses))
        deadline = time.monotonic() + 120
        while len(statuses) < 3 * CLIENTS and time.monotonic() < deadline:  # all clients busy, not a warm-up
            assert not load.done(), load.exception() if load.done() else None
            await asyncio.sleep(0.05)
        stopped.set()
        timing["signalled"] = time.monotonic()
        await asyncio.to_thread(docker.run, "stop", "-t", str(STOP_TIMEOUT), container.id, timeout=120)
        timing["stopped"] = time.monotonic()
        return await asyncio.wait_for(load, 60)

    errors = asyncio.run(scenario())
    took = timing["stopped"] - timing["signalled"]
    state = container.state()
    kinds = {kind: [k for k, _t in errors].count(kind) for kind, _t in errors}
    print(f"\ndocker stop: {statuses.count(200)} x 200, {statuses.count(503)} x 503, transport errors {kinds}, "
          f"stopped in {took:.1f} s, exit code {state['ExitCode']}")
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    assert took < STOP_TIMEOUT  # drained, not SIGKILLed at the timeout
    assert statuses.count(200) >= 3 * CLIENTS and set(statuses) <= {200, 503}
    # Transport errors only once the stop began, and only of a request the server never read: connection
    # refused after the listener closed, or a reset of a connection that was closing.
    assert all(at >= timing["signalled"] for _kind, at in errors), errors
    assert set(kinds) <= {"ConnectError", "ReadError", "RemoteProtocolError"}, kinds
    logs = container.logs()
    assert "Traceback" not in logs, logs[-6000:]
    # Every request the server read (its access log) got its answer to a client: none was cut off.
    assert logs.count('"POST /v1/embeddings HTTP/1.1" ') == len(statuses), logs[-3000:]


@pytest.fixture
def nginx_prefix() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="nginx-docker-"))
    folder.chmod(0o755)  # nginx's workers run unprivileged
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_two_containers_behind_nginx_lose_no_request(docker: DockerDaemon, image: BuildReport,
                                                     model_mount: list[str], nginx_prefix: Path) -> None:
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    env = {**SAME_SETTINGS, "EMBEDDING_LOG_FORMAT": "json"}
    killed, survivor = (Container(docker, free_port(), env, [*LOCKED_DOWN, *model_mount]) for _ in range(2))
    for container in (killed, survivor):
        container.wait_healthy()
    access_log = nginx_prefix / "access.log"
    listen_port = free_port()
    nginx = Nginx(binary, site_config([killed.port, survivor.port], listen_port, access_log), nginx_prefix,
                  listen_port)
    traffic = Traffic(nginx.url)
    try:
        nginx.wait_ready()
        traffic.start()
        traffic.wait_for(100)
        docker.run("kill", killed.id)  # SIGKILL: connections reset, nothing drained
        traffic.wait_for(250)
        traffic.finish()
        assert survivor.state()["Running"] is True
    finally:
        try:
            traffic.finish()
        finally:
            nginx.stop()
    assert traffic.failures == [], f"{len(traffic.failures)} client errors, e.g. {traffic.failures[:5]}"
    lines = access_log.read_text().splitlines()
    upstreams = [m for line in lines if (m := re.search(r"upstream=(.*?) upstream_status=(.*?) rt=", line))]
    reached = {port for match in upstreams for port in re.findall(r":(\d+)", match.group(1))}
    assert {str(killed.port), str(survivor.port)} <= reached, "traffic did not reach both containers"
    retried = [m for m in upstreams if ", " in m.group(1)]
    assert retried, "no request was retried on the other container"
    assert all(m.group(2).split(", ")[-1] == "200" for m in retried), [m.group(0) for m in retried]
    print(f"\nnginx: {traffic.ok} answered, {len(retried)} retried on the survivor after the kill")
    assert_clean_logs(survivor)
    assert_clean_logs(killed)
