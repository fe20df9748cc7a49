"""Do the planned models fit in memory at all? Checked before any model loads, so that a start that cannot
succeed says so at once instead of being killed by the kernel (or failing out of GPU memory) in the middle
of loading the third model.

What each model takes at least, on the device it will run on (`model_claim`):
- its weights in the dtype it runs in: the parameter count of its *.safetensors headers times the dtype's
  size (1 byte with openvino's int8 weights); without readable safetensors, the weight files' size on disk
  (a .bin is read whole into memory while it loads);
- vLLM on a GPU: `gpu_memory_utilization` of the GPU's total memory (weights, activations and KV cache: vLLM
  takes that share of the device for itself); vLLM on a CPU: its weights plus its KV cache space
  (VLLM_CPU_KVCACHE_SPACE GiB, which it allocates at start).
The claims are summed per device and compared with what the device has: the CPU's available memory
(MemAvailable, capped by a cgroup limit), the GPU's total memory (backends/runtime/device.py asks the driver).
Activations, caches of other engines and a load's transient copies are not guessed at: a plan is refused
only when it cannot fit, never because it might not.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .backends.base import BackendOptions
from .backends.runtime.choice import torch_build, vllm_build
from .backends.runtime.device import cpu_has_native_bf16, gpu_total_bytes

__all__ = ["Claim", "available_bytes", "memory_shortfall", "model_claim", "placement", "plan_shortfall"]

_GB = 1 << 30
_MB = 1 << 20
CPU, GPU = "cpu", "cuda"
_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Claim:
    """What one model takes at least on one device, and how that was reckoned (for the refusal's line)."""

    model: str
    device: str  # CPU or GPU
    bytes: int
    how: str  # e.g. "bfloat16 weights", "gpu_memory_utilization 0.40 of the GPU"


def available_bytes(proc: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory this process may still take: MemAvailable, capped by a cgroup v2 limit; None if unknown."""
    available: int | None = None
    try:
        for line in proc.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((cgroup / "memory.current").read_text().strip())
            available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    return available


def placement(engine: str, device: str, gpu: bool) -> str | None:
    """The device a model of `engine` runs on (None: the fake engine, which holds no model), from its
    `device` setting; `auto` is a GPU when there is one (`gpu`) and the engine's installed build can use it.
    Decided from package metadata, as the backends decide it at load, without importing them."""
    if engine == "fake":
        return None
    if engine == "openvino" or device == CPU:
        return CPU
    if device == GPU:
        return GPU
    build = vllm_build() if engine == "vllm" else torch_build()
    return GPU if gpu and build not in (None, "cpu") else CPU


def model_claim(name: str, engine: str, options: BackendOptions, gpu_total: int | None) -> Claim | None:
    """What model `name` takes at least on its device (module docstring); None for the fake engine."""
    device = placement(engine, options.device, gpu_total is not None)
    if device is None:
        return None
    if engine == "vllm" and device == GPU and gpu_total is not None:
        return Claim(name, GPU, int(options.gpu_memory_utilization * gpu_total),
                     f"gpu_memory_utilization {options.gpu_memory_utilization:.2f} of the GPU")
    dtype = options.dtype
    if device == CPU and dtype == "float16":  # as backends/runtime/device.resolve_cpu_dtype runs it
        dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    int8 = engine == "openvino" and options.quantize != "none"
    facts = options.facts
    if facts.parameters is not None:
        weights, how = facts.parameters * (1 if int8 else _SIZES.get(dtype, 4)), f"{'int8' if int8 else dtype} weights"
    else:
        weights, how = facts.weight_bytes, "weight files"
    if engine == "vllm" and device == CPU:  # and the KV cache it allocates at start
        from .backends.vllm.embed import CPU_ENV_DEFAULTS  # (imports no vllm)

        space = os.environ.get("VLLM_CPU_KVCACHE_SPACE") or CPU_ENV_DEFAULTS["VLLM_CPU_KVCACHE_SPACE"]
        kv_cache = int(space) * _GB if space.strip().isdigit() else 0
        weights, how = weights + kv_cache, f"{how} + {_size(kv_cache)} KV cache"
    return Claim(name, device, weights, how)


def plan_shortfall(models: Sequence[tuple[str, str, BackendOptions]], copies: int = 1, *,
                   gpu_total: Callable[[], int | None] = gpu_total_bytes,
                   cpu_available: Callable[[], int | None] = available_bytes) -> str | None:
    """memory_shortfall of the planned models (served name, engine, options), each loaded `copies` times (a
    copy per worker process). The GPU is asked about only when a model may run on one."""
    may_use_gpu = any(placement(engine, options.device, True) == GPU for _, engine, options in models)
    gpu = gpu_total() if may_use_gpu else None
    claims = [claim for name, engine, options in models if (claim := model_claim(name, engine, options, gpu))]
    if copies > 1:
        claims = [replace(claim, bytes=claim.bytes * copies, how=f"{claim.how}, x{copies} workers") for claim in claims]
    return memory_shortfall(claims, {CPU: cpu_available(), GPU: gpu})


def memory_shortfall(claims: Sequence[Claim], available: Mapping[str, int | None]) -> str | None:
    """One line saying the models cannot fit on a device (their claims exceed what `available` says it has:
    None for unknown, never a reason to refuse), naming each model's claim; None when they fit."""
    problems = []
    for device in dict.fromkeys(claim.device for claim in claims):
        mine = [claim for claim in claims if claim.device == device]
        total, has = sum(claim.bytes for claim in mine), available.get(device)
        if has is None or total <= has:
            continue
        each = ", ".join(f"{claim.model}: {_size(claim.bytes)} ({claim.how})" for claim in mine if claim.bytes)
        what = f"the GPU has {_size(has)}" if device == GPU else f"{_size(max(has, 0))} of memory is available"
        problems.append(f"on the {'GPU' if device == GPU else 'CPU'} they take at least {_size(total)} ({each}) "
                        f"but {what}")
    if not problems:
        return None
    return (f"the models do not fit in memory: {'; '.join(problems)}: serve fewer or smaller models, or give the "
            "server more memory")


def _size(count: int) -> str:
    return f"{count / _GB:.1f} GB" if count >= _GB else f"{count / _MB:.0f} MB"
