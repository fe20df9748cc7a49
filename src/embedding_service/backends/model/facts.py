"""What a model folder says about itself, read once: architecture, decoder or not, pooling, normalisation,
Matryoshka, sentence-transformers prompts and the longest input, a reranker's labels and activation, the
sentence-transformers modules (and a Router's) with their settings, and so the folder's task.

The one reader of a model folder's JSON files: plain JSON only (no torch, no transformers), so the engine
choice reads them before either is imported, and every backend then uses the same facts (scoring.py,
sparse.py and multivector.py interpret theirs). The special tokens need the tokenizer: tokenization.HfTokenizer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["FAMILIES", "Family", "ModelFacts", "Module", "PoolingMode", "read_model_facts", "safetensors_headers"]

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
class Module:
    """One sentence-transformers module of the folder (modules.json's, or a Router's): its class, its folder
    and that folder's config.json (None when it has none that reads as an object)."""

    type: str  # e.g. sentence_transformers.models.Pooling; a malformed entry: its repr
    path: Path
    config: Mapping[str, Any] | None = None


# PyLate's keys in config_sentence_transformers.json (a ColBERT folder)
_PYLATE_KEYS = ("query_prefix", "document_prefix", "query_length", "document_length", "do_query_expansion")


@dataclass(frozen=True)
class ModelFacts:
    model_dir: str | None
    config_found: bool  # config.json exists and is a JSON object
    model_type: str | None  # lower case; None when unknown
    architectures: tuple[str, ...] = ()
    hidden_size: int | None = None
    # The input widths of the transformer's linear layers (hidden, intermediate, heads x head_dim); () unless
    # config.json names at least the first two (an unknown width must not be assumed to divide anything).
    linear_widths: tuple[int, ...] = ()
    max_position_embeddings: int | None = None
    pooling: PoolingMode = "mean"
    normalize: bool = True
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    # sentence_bert_config.json's max_seq_length: the length the model was trained and is served at by
    # sentence-transformers (all-MiniLM-L6-v2: 256 of its 512 positions). vLLM refuses a longer max_model_len.
    max_seq_length: int | None = None
    weight_bytes: int = 0  # the weight files' size on disk (*.safetensors, else *.bin): a floor on the memory needed
    parameters: int | None = None  # how many weights the *.safetensors headers list (None: no safetensors, or unread)
    # config_sentence_transformers.json's model_type: SentenceTransformer, SparseEncoder, CrossEncoder (v5+).
    sentence_transformers_type: str | None = None
    # A cross-encoder's: config's num_labels, else its id2label's size, else 2 (transformers' default), and
    # sentence-transformers' activation name (config's sentence_transformers.activation_fn or
    # sbert_ce_default_activation_function; None: sigmoid)
    num_labels: int = 2
    activation_fn: str | None = None
    has_modules: bool = False  # modules.json is a file (a sentence-transformers folder)
    modules: tuple[Module, ...] = ()
    st_config: Mapping[str, Any] = field(default_factory=dict)  # config_sentence_transformers.json (PyLate's)
    router: Mapping[str, Any] | None = None  # router_config.json (a sentence-transformers Router)
    router_modules: Mapping[str, Module] = field(default_factory=dict)  # the Router's modules, by name

    @property
    def colbert(self) -> bool:
        """A folder PyLate saved: a pylate module in modules.json, or PyLate's keys (or model_type ColBERT) in
        config_sentence_transformers.json."""
        return (any(module.type.startswith("pylate.") for module in self.modules)
                or self.st_config.get("model_type") == "ColBERT" or any(k in self.st_config for k in _PYLATE_KEYS))

    @property
    def task(self) -> Literal["embed", "sparse", "multivector"]:
        """The task the folder's files say (engine/types.py's names), the one rule: sparse for a folder
        sentence-transformers saved as a SparseEncoder, multivector for one PyLate saved (ColBERT), else embed
        (a reranker is served only when asked for: task rerank)."""
        if self.sentence_transformers_type == "SparseEncoder":
            return "sparse"
        return "multivector" if self.colbert else "embed"

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


def _modules(root: Path) -> tuple[Module, ...]:
    """modules.json's entries, each with its folder's config.json."""
    entries = _read_json(root / "modules.json")
    modules = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            modules.append(Module(repr(entry), root))
            continue
        kind = str(entry.get("type", ""))
        # (a Pooling module without a path: sentence-transformers' 1_Pooling)
        plain_pooling = kind.endswith("Pooling") and not kind.endswith("SpladePooling")
        folder = root / str(entry.get("path", "1_Pooling" if plain_pooling else ""))
        modules.append(Module(kind, folder, _config(folder)))
    return tuple(modules)


def _router_modules(root: Path, router: Mapping[str, Any] | None) -> dict[str, Module]:
    """A Router's modules (router_config.json's types), each in the sub-folder of its name."""
    types = router.get("types") if router is not None else None
    if not isinstance(types, dict):
        return {}
    return {str(name): Module(str(kind), root / str(name), _config(root / str(name))) for name, kind in types.items()}


def _config(folder: Path) -> Mapping[str, Any] | None:
    data = _read_json(folder / "config.json")
    return data if isinstance(data, dict) else None


def _pooling(modules: tuple[Module, ...], has_modules: bool, decoder: bool) -> tuple[PoolingMode, bool]:
    """Pooling and normalisation from modules.json / 1_Pooling; without them, last-token for decoders."""
    pooling: PoolingMode = "last" if decoder else "mean"
    if not has_modules:
        return pooling, True
    normalize = any(module.type.endswith("Normalize") for module in modules)
    for module in modules:
        if module.type.endswith("Pooling"):
            cfg = module.config or {}
            if cfg.get("pooling_mode_lasttoken"):
                pooling = "last"
            elif cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_mean_tokens"):
                pooling = "mean"
    return pooling, normalize


def _labels(config: Mapping[str, Any]) -> int:
    id2label = config.get("id2label")
    count = len(id2label) if isinstance(id2label, (dict, list)) else 0
    labels = config.get("num_labels") or count or 2
    return labels if isinstance(labels, int) else 2


def _activation_fn(config: Mapping[str, Any]) -> str | None:
    st = config.get("sentence_transformers")
    name = st.get("activation_fn") if isinstance(st, dict) else None
    name = name or config.get("sbert_ce_default_activation_function")
    return str(name) if name else None


def _linear_widths(config: Mapping[str, Any]) -> tuple[int, ...]:
    hidden, intermediate = _positive_int(config.get("hidden_size")), _positive_int(config.get("intermediate_size"))
    heads, head_dim = _positive_int(config.get("num_attention_heads")), _positive_int(config.get("head_dim"))
    if not (hidden and intermediate):
        return ()
    return hidden, intermediate, heads * head_dim if heads and head_dim else hidden


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
    has_modules = (root / "modules.json").is_file()
    modules = _modules(root)
    pooling, normalize = _pooling(modules, has_modules, family is not None and family.decoder)
    router = _read_json(root / "router_config.json")
    router = router if isinstance(router, dict) else None
    st = _object(root / "config_sentence_transformers.json")
    prompts = st.get("prompts") if isinstance(st.get("prompts"), dict) else {}
    default_prompt = st.get("default_prompt_name") if isinstance(st.get("default_prompt_name"), str) else None
    return ModelFacts(
        model_dir=str(root),
        config_found=found,
        model_type=model_type,
        architectures=tuple(str(a) for a in architectures) if isinstance(architectures, list) else (),
        hidden_size=_positive_int(config.get("hidden_size")),
        linear_widths=_linear_widths(config),
        max_position_embeddings=_positive_int(config.get("max_position_embeddings")),
        pooling=pooling,
        normalize=normalize,
        prompts={str(k): str(v) for k, v in (prompts or {}).items()},
        default_prompt_name=default_prompt,
        max_seq_length=_positive_int(_object(root / "sentence_bert_config.json").get("max_seq_length")),
        weight_bytes=_weight_bytes(root),
        parameters=_parameters(root),
        sentence_transformers_type=str(st["model_type"]) if isinstance(st.get("model_type"), str) else None,
        num_labels=_labels(config),
        activation_fn=_activation_fn(config),
        has_modules=has_modules,
        modules=modules,
        st_config=st,
        router=router,
        router_modules=_router_modules(root, router),
    )


def _weight_files(root: Path) -> list[Path]:
    """The weight files an engine loads: the *.safetensors (transformers prefers them), else the *.bin."""
    try:
        files = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    except OSError:
        return []
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files


def _weight_bytes(root: Path) -> int:
    try:
        return sum(path.stat().st_size for path in _weight_files(root))
    except OSError:
        return 0


_MAX_SAFETENSORS_HEADER = 100 << 20  # the format's own bound


def safetensors_headers(files: Sequence[Path]) -> list[dict[str, Any]] | None:
    """Each *.safetensors file's header (8 bytes of length, then JSON naming each tensor with its shape), read
    without loading anything. None when one cannot be read or is not a header."""
    headers = []
    for path in files:
        try:
            with path.open("rb") as file:
                size = int.from_bytes(file.read(8), "little")
                header = json.loads(file.read(size)) if 2 <= size <= _MAX_SAFETENSORS_HEADER else None
        except (OSError, ValueError):  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            return None
        if not isinstance(header, dict):
            return None
        headers.append(header)
    return headers


def _parameters(root: Path) -> int | None:
    """The weights the *.safetensors files hold, from their headers. None without safetensors, or when one
    cannot be read."""
    files = [path for path in _weight_files(root) if path.suffix == ".safetensors"]
    headers = safetensors_headers(files)
    if headers is None:
        return None
    total = 0
    for header in headers:
        for key, tensor in header.items():
            shape = tensor.get("shape") if isinstance(tensor, dict) else None
            if key == "__metadata__":
                continue
            if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
                return None
            total += math.prod(shape)
    return total if files else None
