"""The same closed loop as `loadgen.drive`, sent by wrk (C, one thread, keep-alive): `python -m bench --client wrk`.

Why: on a small machine the load generator runs on the cores it measures. The aiohttp client costs ~0.1-0.16
ms of CPU per request; at 64 clients on 2 cores that is ~3% of the machine, and each unit of CPU taken from
vLLM's OpenMP team costs the model about two (bench/RESULTS.md). wrk costs a fraction of that, so the ratio
of our server to its engine in-process shows more of what the server costs and less of what the client
does. Needs `wrk` on PATH (Debian: `apt-get install wrk`); bench/wrk_driver.lua does the sending.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.loadgen import RunResult, encode_body

__all__ = ["drive_wrk", "wrk_available"]

SCRIPT = Path(__file__).with_name("wrk_driver.lua")


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def _run(cmd: list[str]) -> tuple[int, str, str, float]:
    """Run wrk to the end, interrupting it (SIGINT: it then reports as usual) once the script says every body
    was answered; (exit status, stdout, stderr, its CPU seconds from wait4)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("WRK_ALL_ANSWERED"):
                proc.send_signal(signal.SIGINT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # (reaped here: Popen must not wait for it)
        err.seek(0)
        return proc.returncode, "".join(lines), err.read().decode(), usage.ru_utime + usage.ru_stime


async def drive_wrk(
    url: str,
    requests: Sequence[list[str]],
    *,
    concurrency: int,
    duration_s: float,
    model: str | None = None,
    encoding: str = "float",
    instruction: str | None = None,
    timeout_s: float = 300.0,
) -> RunResult:
    """Send `requests` in order, `concurrency` in flight, until all are answered or `duration_s` passes."""
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl") as bodies:
        for texts in requests:  # orjson escapes newlines: one body per line
            bodies.write(encode_body(texts, model, encoding, instruction) + b"\n")
        bodies.flush()
        cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, math.ceil(duration_s))}s",
               f"--timeout={math.ceil(timeout_s)}s", "-s", str(SCRIPT), url, "--", bodies.name]
        code, out, err, cpu_s = await asyncio.get_running_loop().run_in_executor(None, _run, cmd)
    line = next((ln for ln in out.splitlines() if ln.startswith("WRK_RESULT ")), None)
    if code != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {code}): {(err or out)[-300:]}")
    data = json.loads(line.split(" ", 1)[1])
    result = RunResult(requests=data["ok"], texts=data["texts"], tokens=data["tokens"],
                       errors=data["failed"] + data["socket_errors"], wall_s=data["duration_us"] / 1e6,
                       client_cpu_s=cpu_s,
                       percentiles_ms=(data["p50_us"] / 1000, data["p95_us"] / 1000, data["p99_us"] / 1000))
    if result.errors:
        result.error_samples.append(f"{data['failed']} non-200 responses, {data['socket_errors']} socket errors")
    return result
