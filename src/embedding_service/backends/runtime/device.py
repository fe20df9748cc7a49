"""CPU feature detection, the dtype/device choice shared by the torch and vLLM backends, and the GPU's memory."""

from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache
from pathlib import Path

__all__ = ["CPU_FLAGS_OVERRIDE_ENV", "GPU_MEMORY_OVERRIDE_ENV", "cpu_flags", "cpu_has_native_bf16", "gpu_total_bytes",
           "int8_dot_product_isa", "int8_slow_reason", "resolve_cpu_dtype"]

log = logging.getLogger("embedding_service")

# Tests only: pretend to be another kind of CPU (e.g. "avx2" or "avx2 avx512_bf16 amx_bf16"), so that a developer
# on one machine runs the dtype choices every CI machine makes. Only the dtype choice reads it; kernels still run
# on the real CPU (bf16 where not native is emulated: slow, same numbers).
CPU_FLAGS_OVERRIDE_ENV = "EMBEDDING_TEST_CPU_FLAGS"
# Tests only: pretend that the first GPU has this many bytes of memory (0: that there is none), so that the memory
# check before loading (memory_fit.py) runs its GPU rule on a machine without one. Nothing loads on that GPU.
GPU_MEMORY_OVERRIDE_ENV = "EMBEDDING_TEST_GPU_MEMORY"


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is absent), or the test override."""
    override = os.environ.get(CPU_FLAGS_OVERRIDE_ENV)
    if override is not None:
        log.warning("CPU feature flags overridden by %s=%r (a test setting)", CPU_FLAGS_OVERRIDE_ENV, override)
        return frozenset(override.replace(",", " ").split())
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags") or line.startswith("Features"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: bf16 matrix work runs natively, about twice fp32's speed."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_cpu_dtype(requested: str) -> str:
    """The dtype to run on a CPU. float16 (the spec's GPU default) becomes bf16 where native, else fp32."""
    if requested == "float16":
        chosen = "bfloat16" if cpu_has_native_bf16() else "float32"
        log.warning(
            "dtype float16 is meant for GPUs; on this CPU (native bf16: %s) running %s instead",
            "yes" if cpu_has_native_bf16() else "no",
            chosen,
        )
        return chosen
    if requested == "bfloat16" and not cpu_has_native_bf16():
        log.warning("dtype bfloat16 requested on a CPU without native bf16: it will be emulated and slow")
    return requested


# The instructions that make int8 matrix work cheap: one instruction per 4 int8 products summed into int32.
# OpenVINO's CPU plugin quantises activations at run time (--quantize int8) only with one of the first two
# (dnnl_fullyconnected_primitive.cpp: avx2_vnni or avx512_core_vnni; AMX CPUs have both); without them it runs
# int8 weights with fp32 arithmetic, and oneDNN's static int8 falls back to its slow generic gemm.
_INT8_DOT_PRODUCT_FLAGS = (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"))


def int8_dot_product_isa(flags: frozenset[str]) -> str | None:
    """The best int8 dot-product instruction set among `flags` (cpu_flags()), None where there is none."""
    return next((name for flag, name in _INT8_DOT_PRODUCT_FLAGS if flag in flags), None)


def int8_slow_reason(flags: frozenset[str]) -> str | None:
    """Why --quantize int8 gains little on this CPU, or None where it pays (or the flags are unknown: no
    /proc/cpuinfo, so nothing to say). Measured in bench/RESULTS.md (issue 41)."""
    if not flags or not any(f.startswith(("avx", "amx")) for f in flags) or int8_dot_product_isa(flags):
        return None
    return ("this CPU has no int8 dot-product instructions (no AVX-VNNI, AVX-512 VNNI or AMX among its flags), so "
            "OpenVINO does not quantise activations and int8 runs as int8 weights with fp32 arithmetic: measured "
            "1.08x `vllm serve` fp32 on MiniLM batches (1.8x with VNNI or AMX) and 0.45-0.84x on the Qwen3-0.6B "
            "shape (docs/openvino.md). The exact path is about as fast here: consider dropping --quantize int8")


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def gpu_total_bytes() -> int | None:
    """The memory of the GPU that CUDA's device 0 is (the first of CUDA_VISIBLE_DEVICES), or the test override;
    None without a GPU, its driver, or a GPU this process may use.

    Asked of NVML, the driver's management library, through ctypes: torch.cuda would import torch and create
    a CUDA context in the process that plans, before the OpenMP settings are made and before `workers` fork
    (a forked CUDA context is unusable). Where CUDA's numbering may differ from NVML's (several GPUs, no
    CUDA_DEVICE_ORDER=PCI_BUS_ID), the largest GPU's: the check must never refuse a start that would work.
    """
    override = os.environ.get(GPU_MEMORY_OVERRIDE_ENV)
    if override is not None:
        log.warning("GPU memory overridden by %s=%r (a test setting)", GPU_MEMORY_OVERRIDE_ENV, override)
        return (int(override) or None) if override.strip().isdigit() else None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = "0" if visible is None else visible.split(",")[0].strip()
    if not first or first.startswith("-"):  # CUDA_VISIBLE_DEVICES="" or -1: no GPU for this process
        return None
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        if not first.isdigit():  # a GPU-... or MIG-... UUID names exactly one device
            return _nvml_total(nvml, first)
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        pci_order = os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID" or count.value == 1
        indices = [int(first)] if pci_order else range(count.value)
        known = [total for i in indices if (total := _nvml_total(nvml, i)) is not None]
        return max(known) if known else None
    finally:
        nvml.nvmlShutdown()


def _nvml_total(nvml: ctypes.CDLL, device: int | str) -> int | None:
    """The total memory of NVML's device `device` (an index or a UUID), None if NVML cannot say."""
    handle, memory = ctypes.c_void_p(), _NvmlMemory()
    found = (nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(device), ctypes.byref(handle)) if isinstance(device, int)
             else nvml.nvmlDeviceGetHandleByUUID(device.encode(), ctypes.byref(handle)))
    if found != 0 or nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
        return None
    return int(memory.total)
