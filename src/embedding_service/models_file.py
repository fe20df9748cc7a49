"""The models file (`--models-file` / EMBEDDING_MODELS_FILE): several models in one server, each with its own
name(s), task and per-model settings. docs/models.md shows the format.

Each entry becomes the settings of one model: the server-wide settings with the entry's per-model fields laid
over them, validated by EmbeddingConfig itself (so a per-model value obeys the same bounds as its flag). Any
error is one line naming the file, the entry and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .backends.model.facts import read_model_facts
from .config import MODEL_FLAGS, EmbeddingConfig
from .engine.types import EMBED, TASKS

__all__ = ["PER_MODEL_FIELDS", "TASKS", "ModelEntry", "ModelsFileError", "read_models_file"]

# The settings a model may set for itself: how it is loaded, run, batched and limited. Everything else
# (host, port, keys, rate limits, timeouts of the connection, logging) is the server's.
PER_MODEL_FIELDS = frozenset({
    "engine", "device", "dtype", "max_model_len", "max_batch_size", "max_batch_tokens", "batch_timeout_ms",
    "gpu_memory_utilization", "tensor_parallel_size", "enforce_eager", "torch_compile", "vllm_engine_core",
    "prefix_caching", "batch_invariant", "quantize", "openvino_cache_dir", "truncate", "long_inputs",
    "max_chunked_input_tokens", "max_inputs_per_request", "max_request_tokens", "max_queue_requests",
    "max_queue_tokens", "request_timeout_s", "max_rerank_documents", "matryoshka_models", "max_token_vectors_bytes",
    "int8_ranges",
})
_ENTRY_FIELDS = frozenset({"name", "aliases", "task", "model_path", "model_name", "demo"})
_MAX_MODELS = 64
_MAX_FILE_BYTES = 1 << 20


class ModelsFileError(ValueError):
    """The models file cannot be used; the message is one line naming the file, entry and field."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of the file: its served name, other names, task and its own complete settings."""

    name: str
    aliases: tuple[str, ...]
    task: str
    settings: EmbeddingConfig


def read_models_file(settings: EmbeddingConfig) -> list[ModelEntry]:
    """The models `settings.models_file` lists, in order. Raises ModelsFileError."""
    import yaml

    path = Path(settings.models_file or "")
    where = f"models file {path}"
    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            raise ModelsFileError(f"{where}: larger than {_MAX_FILE_BYTES} bytes")
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelsFileError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeError) as exc:
        raise ModelsFileError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(document, dict) or set(document) != {"models"} or not isinstance(document["models"], list):
        raise ModelsFileError(f"{where}: expected one key, `models:`, holding a list of models")
    raw = document["models"]
    if not 1 <= len(raw) <= _MAX_MODELS:
        raise ModelsFileError(f"{where}: models: lists {len(raw)} models; give 1 to {_MAX_MODELS}")
    entries = [_entry(settings, f"{where}: models[{index}]", item) for index, item in enumerate(raw)]
    seen: dict[str, str] = {}
    for entry in entries:
        for served in (entry.name, *entry.aliases):
            if served in seen:
                raise ModelsFileError(f"{where}: the name '{served}' is given twice ({seen[served]} and "
                                      f"{entry.name}); every name and alias must be unique")
            seen[served] = entry.name
    return entries


def _task_of(model_path: Any) -> str:
    """The task an entry without `task:` gets: what its folder's files say (ModelFacts.task), else embed."""
    if isinstance(model_path, str) and model_path:
        return read_model_facts(model_path).task
    return EMBED


def _entry(server: EmbeddingConfig, where: str, item: Any) -> ModelEntry:
    if not isinstance(item, dict):
        raise ModelsFileError(f"{where}: expected a mapping (name:, model_path:, task:, ...)")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ModelsFileError(f"{where}: name: required, a non-empty string (the name clients send as `model`)")
    where = f"{where} ({name})"
    for key in item:
        if key not in _ENTRY_FIELDS and key not in PER_MODEL_FIELDS:
            hint = " (a server-wide setting: give it as a flag or EMBEDDING_ variable)" \
                if key in EmbeddingConfig.model_fields else ""
            raise ModelsFileError(f"{where}: {key}: not a per-model field{hint}")
    task = item.get("task", _task_of(item.get("model_path")))
    if task not in TASKS:
        raise ModelsFileError(f"{where}: task: {task!r}; one of {', '.join(TASKS)}")
    aliases = item.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise ModelsFileError(f"{where}: aliases: expected a list of names")
    sources = [key for key in ("model_path", "model_name", "demo") if item.get(key)]
    if len(sources) != 1:
        raise ModelsFileError(f"{where}: give exactly one of model_path, model_name (a hub id) or demo: true")
    if item.get("demo") and task != "embed":
        raise ModelsFileError(f"{where}: demo: the demo model is an embedding model (task: embed)")
    values = server.model_dump()
    for flag in (*MODEL_FLAGS, "models_file"):
        values[flag] = EmbeddingConfig.model_fields[flag].get_default()
    values.update({key: item[key] for key in PER_MODEL_FIELDS if key in item})
    if task != "rerank":  # (an embedding, sparse or multi-vector model: the model flags)
        values.update(served_model_name=name, demo=bool(item.get("demo")), model_path=item.get("model_path"))
        if item.get("model_name"):
            values["model_name"] = item["model_name"]
    else:
        values.update(rerank_model=item.get("model_name"), rerank_model_path=item.get("model_path"),
                      served_rerank_model_name=name, rerank_only=True)
    try:
        settings = EmbeddingConfig(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error.get("loc", ())) or "settings"
        raise ModelsFileError(f"{where}: {field}: {error['msg']}") from None
    return ModelEntry(name=name, aliases=tuple(aliases), task=task, settings=settings)
