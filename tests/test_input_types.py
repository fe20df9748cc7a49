"""input_type per model: sentence-transformers prompts, Qwen3's instructions, as-is, strict; explicit options win."""

from __future__ import annotations

import pytest

from embedding_service.engine.input_types import TASK_INSTRUCTIONS, resolve_input_type
from embedding_service.errors import ServiceError

QWEN3 = {"query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
         "document": ""}  # Qwen3-Embedding's config_sentence_transformers.json
E5 = {"query": "query: ", "passage": "passage: "}


def resolve(input_type: str | None, prompts: dict[str, str], **options: object) -> tuple[str | None, str | None]:
    return resolve_input_type(input_type, instruction=options.get("instruction"),  # type: ignore[arg-type]
                              prompt_name=options.get("prompt_name"), prompts=prompts,  # type: ignore[arg-type]
                              strict=bool(options.get("strict")))


@pytest.mark.parametrize(("input_type", "expected"), [
    ("search_query", (None, "query")),
    ("search_document", (None, "document")),
    ("classification", (TASK_INSTRUCTIONS["classification"], None)),
    ("clustering", (TASK_INSTRUCTIONS["clustering"], None)),
    (None, (None, None)),
])
def test_qwen3(input_type: str | None, expected: tuple[str | None, str | None]) -> None:
    assert resolve(input_type, QWEN3) == expected


@pytest.mark.parametrize(("input_type", "expected"), [
    ("search_query", (None, "query")), ("search_document", (None, "passage")),
    ("classification", (None, None)), ("clustering", (None, None)),  # e5 has no such prompts: as it is
])
def test_sentence_transformers_prompts(input_type: str, expected: tuple[str | None, str | None]) -> None:
    assert resolve(input_type, E5) == expected


def test_explicit_options_win_but_the_value_is_still_checked() -> None:
    assert resolve("search_query", QWEN3, instruction="Find code") == ("Find code", None)
    assert resolve("search_document", E5, prompt_name="query") == (None, "query")
    with pytest.raises(ServiceError, match="input_type must be one of"):
        resolve("image", QWEN3, instruction="Find code")


def test_a_model_without_prompts_embeds_as_is_unless_strict() -> None:
    for input_type in ("search_query", "search_document", "classification", "clustering"):
        assert resolve(input_type, {}) == (None, None)
    assert resolve("search_document", {}, strict=True) == (None, None)
    for input_type in ("search_query", "classification", "clustering"):
        with pytest.raises(ServiceError, match="input_type_strict") as caught:
            resolve(input_type, {}, strict=True)
        assert caught.value.status == 400 and caught.value.param == "input_type"
