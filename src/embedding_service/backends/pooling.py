"""Pooling and normalisation as pure functions, plus reading a model's sentence-transformers config.

The tensor functions take torch tensors but never import torch at module level, so the API layer can
import this module (for `l2_normalize` / `truncate_dimensions`) without pulling torch in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "PoolingMode",
    "SentenceTransformersConfig",
    "cls_pool",
    "l2_normalize",
    "last_token_pool",
    "mean_pool",
    "pool",
    "pool_numpy",
    "read_st_config",
    "truncate_dimensions",
]

PoolingMode = Literal["mean", "cls", "last"]

# Architectures that read left to right: their sentence vector is the last token's state.
_DECODER_MODEL_TYPES = {"qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3", "phi3"}


@dataclass(frozen=True)
class SentenceTransformersConfig:
    pooling: PoolingMode
    normalize: bool
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    # sentence_bert_config.json's max_seq_length: the length the model was trained and is served at by
    # sentence-transformers (all-MiniLM-L6-v2: 256 of its 512 positions). vLLM refuses a longer max_model_len.
    max_seq_length: int | None = None

    def length_limit(self, max_position_embeddings: int | None) -> int | None:
        """The longest input the model takes: its positions, capped by sentence-transformers' length."""
        limits = [n for n in (max_position_embeddings, self.max_seq_length) if n]
        return min(limits) if limits else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_st_config(model_dir: str | Path, model_type: str | None) -> SentenceTransformersConfig:
    """Pooling, normalisation and prompts from modules.json / 1_Pooling / config_sentence_transformers.json.

    Without a sentence-transformers config: last-token for decoder models, mean pooling otherwise.
    """
    root = Path(model_dir)
    default: PoolingMode = "last" if (model_type or "").lower() in _DECODER_MODEL_TYPES else "mean"
    pooling: PoolingMode = default
    normalize = True
    modules_path = root / "modules.json"
    if modules_path.is_file():
        try:
            modules = json.loads(modules_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            modules = []
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules if isinstance(m, dict))
        for module in modules:
            if isinstance(module, dict) and str(module.get("type", "")).endswith("Pooling"):
                cfg = _read_json(root / str(module.get("path", "1_Pooling")) / "config.json")
                if cfg.get("pooling_mode_lasttoken"):
                    pooling = "last"
                elif cfg.get("pooling_mode_cls_token"):
                    pooling = "cls"
                elif cfg.get("pooling_mode_mean_tokens"):
                    pooling = "mean"
    st = _read_json(root / "config_sentence_transformers.json")
    prompts = st.get("prompts") if isinstance(st.get("prompts"), dict) else {}
    default_prompt = st.get("default_prompt_name") if isinstance(st.get("default_prompt_name"), str) else None
    max_seq = _read_json(root / "sentence_bert_config.json").get("max_seq_length")
    return SentenceTransformersConfig(
        pooling=pooling,
        normalize=normalize,
        prompts={str(k): str(v) for k, v in (prompts or {}).items()},
        default_prompt_name=default_prompt,
        max_seq_length=max_seq if isinstance(max_seq, int) and max_seq > 0 else None,
    )


def mean_pool(hidden: Any, mask: Any) -> Any:
    """Average of the token states the attention mask keeps."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    return summed / weights.sum(dim=1).clamp(min=1e-9)


def cls_pool(hidden: Any, mask: Any) -> Any:
    """The first token's state (BERT's [CLS])."""
    del mask
    return hidden[:, 0]


def last_token_pool(hidden: Any, mask: Any) -> Any:
    """The last real token's state, for left- or right-padded batches alike."""
    if bool(mask[:, -1].all()):  # left padding (or no padding): the last column is real everywhere
        return hidden[:, -1]
    lengths = mask.sum(dim=1) - 1
    rows = lengths.new_tensor(range(hidden.shape[0]))
    return hidden[rows, lengths]


_POOLERS = {"mean": mean_pool, "cls": cls_pool, "last": last_token_pool}


def pool(mode: PoolingMode, hidden: Any, mask: Any) -> Any:
    return _POOLERS[mode](hidden, mask)


def pool_numpy(mode: PoolingMode, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The same pooling on numpy arrays (runtimes that hand back numpy: OpenVINO), in float32."""
    hidden = np.asarray(hidden, dtype=np.float32)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        if bool(mask[:, -1].all()):
            return hidden[:, -1]
        return hidden[np.arange(hidden.shape[0]), mask.sum(axis=1) - 1]
    weights = mask[..., None].astype(np.float32)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def truncate_dimensions(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka: keep the first `dimensions` components and re-normalise."""
    if dimensions is None or dimensions >= vectors.shape[-1]:
        return vectors
    return l2_normalize(vectors[..., :dimensions])
