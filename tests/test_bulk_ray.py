"""`embed --ray ADDRESS` on a local Ray cluster (a head and a worker process, CPU only): same output as in-process."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .conftest import free_port, has_module

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not has_module("ray"), reason="needs ray (the bulk extra)")]

RAY = str(Path(sys.executable).with_name("ray"))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """The `ray start --block` process and everything it started share its process group: stop that group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers (gcs_server, monitor) that outlive a slow shutdown
    proc.wait(10)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    common = ["--block", "--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--disable-usage-stats",
              "--node-ip-address", "127.0.0.1", "--temp-dir", temp]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    started: list[subprocess.Popen[bytes]] = []
    try:
        head_log = open(Path(temp) / "head.log", "wb")  # noqa: SIM115 (kept open for the cluster's life)
        started.append(subprocess.Popen(
            [RAY, "start", "--head", "--port", str(port), "--include-dashboard=false",
             "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
             *common], stdout=head_log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        address = f"127.0.0.1:{port}"
        worker_log = open(Path(temp) / "worker.log", "wb")  # noqa: SIM115
        _wait(lambda: _nodes(address, env) >= 1, 90, "head", temp)
        started.append(subprocess.Popen([RAY, "start", "--address", address, *common], stdout=worker_log,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True))
        _wait(lambda: _nodes(address, env) >= 2, 90, "worker", temp)
        yield address
    finally:
        for proc in reversed(started):
            _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _nodes(address: str, env: dict[str, str]) -> int:
    code = (f"import ray; ray.init(address={address!r}, log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    return int(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 and result.stdout.strip() else 0


def _wait(check: object, timeout: float, what: str, temp: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(1)
    logs = "".join((Path(temp) / name).read_text(errors="replace")[-2000:] for name in ("head.log", "worker.log")
                   if (Path(temp) / name).exists())
    raise AssertionError(f"Ray {what} did not come up in {timeout}s:\n{logs}")


def embed(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "embedding_service", "embed", *[str(a) for a in args]],
                          capture_output=True, text=True, timeout=600, env=env)


def test_ray_output_equals_the_single_process_run(ray_cluster: str, tmp_path: Path) -> None:
    texts = [f"Ray row {i}: {'a longer sentence about distributed embedding ' * (i % 4)}end" for i in range(260)]
    texts[77] = None  # type: ignore[call-overload]
    pq.write_table(pa.table({"doc": [f"d{i}" for i in range(260)], "text": texts}), tmp_path / "a.parquet")
    common = ["--id-column", "doc", "--chunk-rows", "40", "--skip-empty", "--demo", "--engine", "torch",
              "--dtype", "float32", "--log-level", "WARNING"]
    single = embed(tmp_path / "a.parquet", "-o", tmp_path / "single.parquet", *common)
    assert single.returncode == 0, single.stderr
    on_ray = embed(tmp_path / "a.parquet", "-o", tmp_path / "ray.parquet", "--ray", ray_cluster, "--ray-actors", "2",
                   *common)
    assert on_ray.returncode == 0, on_ray.stderr
    assert on_ray.stderr.strip().splitlines()[-1].startswith("embedding-service embed: 259 rows, ")
    a, b = pq.read_table(tmp_path / "single.parquet"), pq.read_table(tmp_path / "ray.parquet")
    assert b.column("id").to_pylist() == a.column("id").to_pylist() == [f"d{i}" for i in range(260) if i != 77]
    va = a.column("embedding").combine_chunks().values.to_numpy().reshape(259, -1)
    vb = b.column("embedding").combine_chunks().values.to_numpy().reshape(259, -1)
    assert va.shape == (259, 384) and np.std(va[:, 0]) > 0.01  # real, varied vectors
    # Same chunks, same batches: the same bits, even though every actor runs torch on one thread.
    np.testing.assert_array_equal(vb, va)
    # A bad row found inside the cluster is reported like in-process: one line naming it.
    bad = embed(tmp_path / "a.parquet", "-o", tmp_path / "bad.parquet", "--ray", ray_cluster, "--id-column", "doc",
                "--engine", "fake", "--log-level", "WARNING")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].endswith("a.parquet row 77: text is null (pass --skip-empty to "
                                                        "skip such rows)"), bad.stderr[-2000:]


def _listening(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket and bound UDP socket under `root`."""
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr):
                    found.add((name, conn.laddr.ip, conn.laddr.port))
    return found


def test_ray_local_listens_on_loopback_only(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("".join(f"local Ray row {i}\n" for i in range(64)))
    common = ["--engine", "fake", "--chunk-rows", "16", "--log-level", "WARNING"]
    single = embed(tmp_path / "in.txt", "-o", tmp_path / "single.parquet", *common)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the command sets it itself
    # 64 texts in batches of 200 ms: Ray's services stay up for the samples below to see them.
    proc = subprocess.Popen([sys.executable, "-m", "embedding_service", "embed", str(tmp_path / "in.txt"), "-o",
                             str(tmp_path / "ray.parquet"), "--ray", "local", "--fake-delay-ms", "200",
                             "--max-batch-tokens", "64", *common], stderr=subprocess.PIPE, text=True, env=env)
    seen: set[tuple[str, str, int]] = set()
    try:
        root = psutil.Process(proc.pid)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= _listening(root)
            time.sleep(0.2)
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 0, err
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names, seen  # the samples did see Ray's services
    assert {ip for _, ip, _ in seen} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, sorted(seen)
    a, b = pq.read_table(tmp_path / "single.parquet"), pq.read_table(tmp_path / "ray.parquet")
    assert b.column("id").to_pylist() == a.column("id").to_pylist() == list(range(64))
    assert b.column("embedding").to_pylist() == a.column("embedding").to_pylist()


def test_ray_local_refuses_to_run_on_another_address_when_ray_was_imported_first() -> None:
    # Ray reads the loopback setting when it is imported: imported earlier (a library, a notebook), `--ray local`
    # would listen on every interface, so it stops instead, saying why.
    code = ("import ray\nfrom embedding_service.bulk.ray_runner import start_ray\n"
            "print(ray.util.get_node_ip_address())\n"
            "try:\n    start_ray('local')\nexcept RuntimeError as exc:\n    print(exc)\nelse:\n    print('started')\n")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    if result.stdout.split()[0] == "127.0.0.1":
        pytest.skip("this machine has no address but loopback: Ray runs on 127.0.0.1 anyway")
    assert result.stdout.strip().splitlines()[-1].startswith("--ray local: Ray started on "), result.stdout
    assert "not 127.0.0.1; set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before ray is imported" in result.stdout
