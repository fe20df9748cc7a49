"""What Cohere's `input_type` means for the served model: a sentence-transformers prompt, a Qwen3 instruction,
or nothing.

The rule, for `search_query`, `search_document`, `classification` and `clustering`:
1. An explicit `instruction` or `prompt_name` in the request wins; `input_type` is then only checked.
2. The model's sentence-transformers `prompts` of the matching name: `query` (or `search_query`) for
   search_query; `document`, `passage` (or `search_document`) for search_document; `classification`,
   `clustering`. Qwen3-Embedding ships `query` (its web-search instruction) and `document` (empty), so a
   query gets the card's instruction and a document none, as its card does.
3. An instruction model (its `query` prompt is Qwen3's `Instruct: ...\nQuery:`) without a prompt of that
   name: classification and clustering get the task instructions in `TASK_INSTRUCTIONS`, in the card's style.
4. Otherwise the text is embedded as it is; with `strict` (the operator's `input_type_strict`), an
   input_type other than search_document is refused (400) instead, since the model cannot honour it.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import ErrorKind, ServiceError

__all__ = ["INPUT_TYPES", "TASK_INSTRUCTIONS", "resolve_input_type"]

INPUT_TYPES = ("search_document", "search_query", "classification", "clustering")

_PROMPT_NAMES: dict[str, tuple[str, ...]] = {
    "search_query": ("query", "search_query"),
    "search_document": ("document", "passage", "search_document"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}

# Qwen3-Embedding's card gives one-sentence task instructions ("Given a web search query, retrieve relevant
# passages that answer the query"); these are the same kind of sentence for the two symmetric tasks.
TASK_INSTRUCTIONS: dict[str, str] = {
    "classification": "Classify the given text by its topic, intent or sentiment",
    "clustering": "Identify the main topic or theme of the given text",
}


def _instruction_model(prompts: Mapping[str, str]) -> bool:
    query = prompts.get("query", "")
    return query.startswith("Instruct: ") and query.endswith("\nQuery:")


def resolve_input_type(input_type: str | None, *, instruction: str | None, prompt_name: str | None,
                       prompts: Mapping[str, str], strict: bool = False) -> tuple[str | None, str | None]:
    """The (instruction, prompt_name) a request gets once its `input_type` is applied (see the module's rule)."""
    if input_type is None:
        return instruction, prompt_name
    if input_type not in INPUT_TYPES:
        raise ServiceError(ErrorKind.INVALID_REQUEST, f"input_type must be one of {', '.join(INPUT_TYPES)}, "
                           f"got '{input_type}'", param="input_type")
    if instruction is not None or prompt_name is not None:
        return instruction, prompt_name
    name = next((n for n in _PROMPT_NAMES[input_type] if n in prompts), None)
    if name is not None:
        return None, name
    if input_type in TASK_INSTRUCTIONS and _instruction_model(prompts):
        return TASK_INSTRUCTIONS[input_type], None
    if strict and input_type != "search_document":
        raise ServiceError(ErrorKind.INVALID_REQUEST, f"this model has no prompt for input_type '{input_type}' "
                           "(no sentence-transformers prompt of that name) and the server is strict "
                           "(input_type_strict); send the text with its prompt, or an 'instruction'",
                           param="input_type")
    return None, None
