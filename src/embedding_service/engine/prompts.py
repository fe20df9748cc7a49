"""How an input becomes the text the model sees: Qwen3 instructions and sentence-transformers prompts.

The rule, in order:
1. `instruction` given: `Instruct: {instruction}\\nQuery:{text}` (Qwen3-Embedding's query format, exactly).
2. `prompt_name` given: the model's sentence-transformers prompt of that name is prefixed.
3. Neither: the model's `default_prompt_name` prompt if its config sets one, else the text as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import ErrorKind, ServiceError

__all__ = ["apply_prompt", "format_instruction"]


def format_instruction(instruction: str, text: str) -> str:
    return f"Instruct: {instruction}\nQuery:{text}"


def apply_prompt(
    texts: Sequence[str],
    *,
    instruction: str | None,
    prompt_name: str | None,
    prompts: Mapping[str, str],
    default_prompt_name: str | None,
) -> list[str]:
    if instruction is not None and prompt_name is not None:
        raise ServiceError(ErrorKind.INVALID_REQUEST, "give either 'instruction' or 'prompt_name', not both",
                           param="prompt_name")
    if instruction is not None:
        return [format_instruction(instruction, text) for text in texts]
    name = prompt_name if prompt_name is not None else default_prompt_name
    if name is None:
        return list(texts)
    if name not in prompts:
        known = ", ".join(sorted(prompts)) or "none"
        raise ServiceError(ErrorKind.INVALID_REQUEST,
                           f"unknown prompt_name '{name}'; this model defines: {known}", param="prompt_name")
    prefix = prompts[name]
    return [prefix + text for text in texts]
