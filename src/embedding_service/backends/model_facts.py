"""What a model folder says about itself, read once: architecture, decoder or not, pooling, normalisation,
Matryoshka, sentence-transformers prompts and the longest input.

Plain JSON files only (no torch, no transformers), so the engine choice reads them before either is imported,
and both backends then use the same facts. The special tokens need the tokenizer: tokenization.HfTokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["FAMILIES", "Family", "ModelFacts", "PoolingMode", "read_model_facts"]

PoolingMode = Literal["mean", "cls", "last"]


@dataclass(frozen=True)
class Family:
    """What we know of an architecture (config.json's model_type)."""

    decoder: bool  # reads left to right: without a sentence-transformers config, it pools its last token
    vllm: bool  # vLLM serves it as a pooling (embedding) model (see choice.py)
    matryoshka: bool = False  # trained Matryoshka-style: `dimensions` works without matryoshka_models


# The one list of architectures the service knows.
FAMILIES: dict[str, Family] = {
    "qwen2": Family(decoder=True, vllm=True),
    "qwen3": Family(decoder=True, vllm=True, matryoshka=True),  # Qwen3-Embedding
    "llama": Family(decoder=True, vllm=True),
    "mistral": Family(decoder=True, vllm=True),
    "gemma": Family(decoder=True, vllm=False),
    "gemma2": Family(decoder=True, vllm=True),
    "gemma3": Family(decoder=True, vllm=True),
    "phi3": Family(decoder=True, vllm=False),
    "bert": Family(decoder=False, vllm=True),
    "roberta": Family(decoder=False, vllm=True),
    "xlm-roberta": Family(decoder=False, vllm=True),
    "nomic_bert": Family(decoder=False, vllm=True),
    "modernbert": Family(decoder=False, vllm=True),
}


@dataclass(frozen=True)
class ModelFacts:
    model_dir: str | None
    config_found: bool  # config.json exists and is a JSON object
    model_type: str | None  # lower case; None when unknown
    architectures: tuple[str, ...] = ()
    hidden_size: int | None = None
    max_position_embeddings: int | None = None
    pooling: PoolingMode = "mean"
    normalize: bool = True
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    # sentence_bert_config.json's max_seq_length: the length the model was trained and is served at by
    # sentence-transformers (all-MiniLM-L6-v2: 256 of its 512 positions). vLLM refuses a longer max_model_len.
    max_seq_length: int | None = None
    weight_bytes: int = 0  # the weight files' size on disk (*.safetensors, *.bin): a floor on the memory needed
    # config_sentence_transformers.json's model_type: SentenceTransformer, SparseEncoder, CrossEncoder (v5+).
    sentence_transformers_type: str | None = None

    @property
    def family(self) -> Family | None:
        return FAMILIES.get(self.model_type or "")

    @property
    def decoder(self) -> bool:
        return self.family is not None and self.family.decoder

    @property
    def matryoshka(self) -> bool:
        """Detected from the architecture (Qwen3); the settings may list other models (matryoshka_models)."""
        return self.family is not None and self.family.matryoshka

    @property
    def max_length(self) -> int | None:
        """The longest input the model takes: its positions, capped by sentence-transformers' length."""
        limits = [n for n in (self.max_position_embeddings, self.max_seq_length) if n]
        return min(limits) if limits else None

    def length_limit(self, configured: int) -> int:
        """`configured` (max_model_len), lowered to what the model takes."""
        return min(configured, self.max_length or configured)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _object(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    return data if isinstance(data, dict) else {}


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _pooling(root: Path, decoder: bool) -> tuple[PoolingMode, bool]:
    """Pooling and normalisation from modules.json / 1_Pooling; without them, last-token for decoders."""
    pooling: PoolingMode = "last" if decoder else "mean"
    if not (root / "modules.json").is_file():
        return pooling, True
    modules = _read_json(root / "modules.json")
    entries = [m for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in entries)
    for module in entries:
        if str(module.get("type", "")).endswith("Pooling"):
            cfg = _object(root / str(module.get("path", "1_Pooling")) / "config.json")
            if cfg.get("pooling_mode_lasttoken"):
                pooling = "last"
            elif cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_mean_tokens"):
                pooling = "mean"
    return pooling, normalize


def read_model_facts(model_dir: str | Path | None) -> ModelFacts:
    """The facts of `model_dir`; a missing folder or file gives unknown facts (None / defaults), never raises."""
    if not model_dir:
        return ModelFacts(model_dir=None, config_found=False, model_type=None)
    root = Path(model_dir)
    config = _read_json(root / "config.json")
    found = isinstance(config, dict)
    config = config if found else {}
    raw_type = config.get("model_type")
    model_type = str(raw_type).lower() if raw_type else None
    architectures = config.get("architectures")
    family = FAMILIES.get(model_type or "")
    pooling, normalize = _pooling(root, family is not None and family.decoder)
    st = _object(root / "config_sentence_transformers.json")
    prompts = st.get("prompts") if isinstance(st.get("prompts"), dict) else {}
    default_prompt = st.get("default_prompt_name") if isinstance(st.get("default_prompt_name"), str) else None
    return ModelFacts(
        model_dir=str(root),
        config_found=found,
        model_type=model_type,
        architectures=tuple(str(a) for a in architectures) if isinstance(architectures, list) else (),
        hidden_size=_positive_int(config.get("hidden_size")),
        max_position_embeddings=_positive_int(config.get("max_position_embeddings")),
        pooling=pooling,
        normalize=normalize,
        prompts={str(k): str(v) for k, v in (prompts or {}).items()},
        default_prompt_name=default_prompt,
        max_seq_length=_positive_int(_object(root / "sentence_bert_config.json").get("max_seq_length")),
        weight_bytes=_weight_bytes(root),
        sentence_transformers_type=str(st["model_type"]) if isinstance(st.get("model_type"), str) else None,
    )


def _weight_bytes(root: Path) -> int:
    try:
        return sum(p.stat().st_size for p in root.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    except OSError:
        return 0
