"""The rerank and score wire formats: Cohere/Jina/vLLM rerank (v1 and Cohere v2) and vLLM's /v1/score.

Pydantic models document the bodies (OpenAPI); parsing is done by hand for errors that name the field
and index, in the OpenAI-style envelope. Unknown fields are accepted and ignored, as for embeddings.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field

from ...errors import ErrorKind, ServiceError
from ..schemas import Usage

__all__ = [
    "RerankBody",
    "RerankCall",
    "RerankResponse",
    "ScoreBody",
    "ScoreCall",
    "ScoreResponse",
    "encode_rerank",
    "encode_score",
    "parse_rerank",
    "parse_score",
]


class RerankDocument(BaseModel):
    text: str


class RerankBody(BaseModel):
    """POST /v1/rerank, /rerank and /v2/rerank."""

    model_config = ConfigDict(extra="allow")

    query: str = Field(..., description="the search query")
    documents: list[str | RerankDocument] = Field(..., description="texts, or objects with a 'text' field")
    model: str | None = Field(None, description="selects the served model by name; other names use the reranker")
    top_n: int | None = Field(None, ge=1, description="return only the best top_n results (1..len(documents))")
    return_documents: bool | None = Field(None, description="include each result's document text (default false)")
    max_tokens_per_doc: int | None = Field(None, ge=1, description="Cohere v2: cut each document to this many "
                                           "tokens before scoring")
    instruction: str | None = Field(None, description="Qwen3-Reranker task instruction (default: the card's)")
    truncate: bool | None = Field(None, description="cut over-long documents instead of failing")


class ScoreBody(BaseModel):
    """POST /v1/score (vLLM): text_1 against text_2, 1:1, 1:N or N:N."""

    model_config = ConfigDict(extra="allow")

    text_1: str | list[str]
    text_2: str | list[str]
    model: str | None = None
    instruction: str | None = None
    truncate: bool | None = None


class RerankResult(BaseModel):
    index: int = Field(..., ge=0, description="position of the document in the request")
    relevance_score: float = Field(..., description="the model's score (Qwen3-Reranker: p(yes) in [0, 1])")
    document: RerankDocument | None = Field(None, description="with return_documents: the document")


class BilledUnits(BaseModel):
    input_tokens: int = Field(..., ge=0)
    search_units: int = Field(..., ge=0)


class RerankMeta(BaseModel):
    billed_units: BilledUnits


class RerankResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "rerank-5f0c...", "model": "Qwen/Qwen3-Reranker-0.6B",
        "results": [{"index": 1, "relevance_score": 0.98}, {"index": 0, "relevance_score": 0.02}],
        "usage": {"prompt_tokens": 180, "total_tokens": 180},
        "meta": {"billed_units": {"input_tokens": 180, "search_units": 1}},
    }]})

    id: str
    model: str
    results: list[RerankResult] = Field(..., description="best first; top_n of them when top_n is given")
    usage: Usage
    meta: RerankMeta


class ScoreData(BaseModel):
    index: int = Field(..., ge=0)
    object: Literal["score"]
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[ScoreData]
    usage: Usage


@dataclass
class RerankCall:
    query: str
    documents: list[str]
    model: str | None
    top_n: int | None
    return_documents: bool
    instruction: str | None
    truncate: bool | None
    max_tokens_per_doc: int | None = None


@dataclass
class ScoreCall:
    queries: list[str]
    documents: list[str]
    model: str | None
    instruction: str | None
    truncate: bool | None


def _invalid(message: str, param: str | None) -> ServiceError:
    return ServiceError(ErrorKind.INVALID_REQUEST, message, param=param)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _invalid(f"'{name}' must be a string, got {_type(value)}", name.split("[")[0])
    if not value.strip():
        raise _invalid(f"'{name}' is empty", name.split("[")[0])
    if "\x00" in value:
        raise _invalid(f"'{name}' contains a NUL character", name.split("[")[0])
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(f"'{name}' is not valid Unicode (lone surrogate)", name.split("[")[0]) from None
    return value


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _optional(data: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        want = "an integer" if kind is int else "a boolean" if kind is bool else "a string"
        raise _invalid(f"'{name}' must be {want}, got {_type(value)}", name)
    return value


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _invalid(f"request body must be a JSON object, got {_type(data)}", None)
    return data


def _common(data: dict[str, Any]) -> tuple[str | None, str | None, bool | None]:
    model = _optional(data, "model", str)
    instruction = _optional(data, "instruction", str)
    if instruction is not None and not instruction.strip():
        raise _invalid("'instruction' is empty", "instruction")
    return model, instruction, _optional(data, "truncate", bool)


def parse_rerank(data: Any) -> RerankCall:
    data = _object(data)
    if data.get("query") is None:
        raise _invalid("'query' is required", "query")
    query = _text(data["query"], "query")
    docs = data.get("documents")
    if docs is None:
        raise _invalid("'documents' is required", "documents")
    if not isinstance(docs, list):
        raise _invalid(f"'documents' must be a list of strings or {{\"text\": ...}} objects, got {_type(docs)}",
                       "documents")
    if not docs:
        raise _invalid("'documents' is an empty list; send at least one document", "documents")
    texts = []
    for index, doc in enumerate(docs):
        if isinstance(doc, dict):
            if "text" not in doc:
                raise _invalid(f"documents[{index}] is an object without 'text'", "documents")
            doc = doc["text"]
        texts.append(_text(doc, f"documents[{index}]"))
    max_tokens_per_doc = _optional(data, "max_tokens_per_doc", int)  # Cohere v2: cut each document, no error
    if max_tokens_per_doc is not None and max_tokens_per_doc < 1:
        raise _invalid(f"max_tokens_per_doc must be at least 1, got {max_tokens_per_doc}", "max_tokens_per_doc")
    top_n = _optional(data, "top_n", int)
    if top_n is not None and not 1 <= top_n <= len(texts):
        raise _invalid(f"top_n must be between 1 and the number of documents ({len(texts)}), got {top_n}",
                       "top_n")
    return_documents = _optional(data, "return_documents", bool)
    model, instruction, truncate = _common(data)
    return RerankCall(query, texts, model, top_n, bool(return_documents), instruction, truncate,
                      max_tokens_per_doc)


def _texts(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [_text(value, name)]
    if not isinstance(value, list):
        raise _invalid(f"'{name}' must be a string or a list of strings, got {_type(value)}", name)
    if not value:
        raise _invalid(f"'{name}' is an empty list", name)
    return [_text(item, f"{name}[{i}]") for i, item in enumerate(value)]


def parse_score(data: Any) -> ScoreCall:
    data = _object(data)
    for name in ("text_1", "text_2"):
        if data.get(name) is None:
            raise _invalid(f"'{name}' is required", name)
    first, second = _texts(data["text_1"], "text_1"), _texts(data["text_2"], "text_2")
    if len(first) == 1:
        first = first * len(second)
    elif len(first) != len(second):
        raise _invalid(f"text_1 has {len(first)} texts and text_2 {len(second)}: send one text_1 (1:N) or "
                       "lists of the same length (pairs)", "text_2")
    model, instruction, truncate = _common(data)
    return ScoreCall(first, second, model, instruction, truncate)


def encode_rerank(call: RerankCall, scores: np.ndarray, model: str, tokens: int) -> bytes:
    """Results best first (ties keep document order), cut to top_n; Cohere/Jina/vLLM field names."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    if call.top_n is not None:
        order = order[: call.top_n]
    results = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
        if call.return_documents:
            item["document"] = {"text": call.documents[i]}
        results.append(item)
    body = {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": model,
        "results": results,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "meta": {"billed_units": {"input_tokens": tokens, "search_units": 1}},
    }
    return orjson.dumps(body)


def encode_score(scores: np.ndarray, model: str, tokens: int) -> bytes:
    data = [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(scores)]
    return orjson.dumps({
        "id": f"score-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
