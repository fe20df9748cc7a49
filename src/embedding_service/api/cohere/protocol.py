"""Cohere's embed wire format: v2 (POST /v2/embed, `cohere.ClientV2().embed`) and v1 (POST /v1/embed,
`cohere.Client().embed`, which LangChain's CohereEmbeddings calls): the same request, and the same answer
except that v1 without `embedding_types` answers `embeddings_floats`, a plain list of vectors.

Parsing is by hand, for errors that name the field; unknown fields (`priority`, ...) are accepted and ignored.
Errors are Cohere's shape, `{"id", "message"}` (cohere_errors.py).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, RootModel

from ...engine.input_types import INPUT_TYPES
from ...errors import ErrorKind, ServiceError
from ...vector_types import EMBEDDING_TYPES, EmbeddingType, encode_vectors

__all__ = [
    "CohereEmbedBody",
    "CohereEmbedCall",
    "CohereEmbedResponse",
    "CohereEmbedV1Response",
    "encode_cohere_embed",
    "long_input_warnings",
    "parse_cohere_embed",
]

TRUNCATE_VALUES = ("NONE", "START", "END")


class CohereEmbedBody(BaseModel):
    """POST /v2/embed (Cohere's embed v2 request)."""

    model_config = ConfigDict(extra="allow")

    texts: list[str] = Field(..., min_length=1, description="the texts to embed")
    model: str | None = Field(None, description="selects the served embedding model by name; others get the default")
    input_type: Literal["search_document", "search_query", "classification", "clustering"] | None = Field(
        None, description="what the texts are: a query gets the model's query prompt or instruction (see docs)")
    embedding_types: list[Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]] | None = Field(
        None, description="the types to return (default: float); int8/uint8 use the model's ranges (int8_ranges)")
    output_dimension: int | None = Field(None, ge=1, description="Matryoshka models only: output size")
    max_tokens: int | None = Field(None, ge=1, description="tokens per text at most (at most the model's limit)")
    truncate: Literal["NONE", "START", "END"] | None = Field(
        None, description="over-long texts: NONE is not cut (400, unless chunking); END cuts the end, START the "
        "start; absent: the server's long_inputs (refuse unless set)")
    long_inputs: Literal["refuse", "truncate", "chunk"] | None = Field(
        None, description="extension: refuse, truncate (the end) or chunk (embed windows and average them); "
        "meta.warnings says which texts were cut or chunked")


class BilledUnits(BaseModel):
    input_tokens: int = Field(..., ge=0)


class EmbedMeta(BaseModel):
    billed_units: BilledUnits
    warnings: list[str] | None = Field(None, description="texts truncated or chunked (absent when none)")


class EmbeddingsByType(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    float_: list[list[float]] | None = Field(None, alias="float")
    int8: list[list[int]] | None = None
    uint8: list[list[int]] | None = None
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[str] | None = None


class CohereEmbedResponse(BaseModel):
    id: str
    response_type: Literal["embeddings_by_type"]
    embeddings: EmbeddingsByType = Field(..., description="one list of vectors per requested type")
    texts: list[str]
    meta: EmbedMeta


class CohereFloatsResponse(BaseModel):
    id: str
    response_type: Literal["embeddings_floats"]
    embeddings: list[list[float]]
    texts: list[str]
    meta: EmbedMeta


class CohereEmbedV1Response(RootModel[CohereEmbedResponse | CohereFloatsResponse]):
    """v1: by type when embedding_types is sent, else plain floats."""


@dataclass
class CohereEmbedCall:
    texts: list[str]
    model: str | None
    input_type: str | None
    embedding_types: list[EmbeddingType]
    output_dimension: int | None
    max_tokens: int | None
    truncate: str | None  # NONE, START or END; None: not sent
    types_given: bool = True  # embedding_types was sent (v1 answers plain floats without it)
    long_inputs: str | None = None  # the extension field: refuse, truncate or chunk


def _invalid(message: str, param: str | None) -> ServiceError:
    return ServiceError(ErrorKind.INVALID_REQUEST, message, param=param)


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _optional(data: dict[str, Any], name: str, kind: type) -> Any:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        want = "an integer" if kind is int else "a string"
        raise _invalid(f"'{name}' must be {want}, got {_type(value)}", name)
    if isinstance(value, int) and value < 1:
        raise _invalid(f"'{name}' must be at least 1, got {value}", name)
    return value


def _texts(data: dict[str, Any]) -> list[str]:
    for other in ("images", "inputs"):
        if data.get(other) is not None:
            raise _invalid(f"'{other}' is not supported here: this server embeds text; send 'texts'", other)
    texts = data.get("texts")
    if texts is None:
        raise _invalid("'texts' is required", "texts")
    if not isinstance(texts, list):
        raise _invalid(f"'texts' must be a list of strings, got {_type(texts)}", "texts")
    if not texts:
        raise _invalid("'texts' is an empty list; send at least one text", "texts")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise _invalid(f"texts[{index}] is {_type(text)}; all items must be strings", "texts")
        if not text:
            raise _invalid(f"texts[{index}] is an empty string", "texts")
        if "\x00" in text:
            raise _invalid(f"texts[{index}] contains a NUL character", "texts")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _invalid(f"texts[{index}] is not valid Unicode (lone surrogate)", "texts") from None
    return texts


def _embedding_types(value: Any) -> list[EmbeddingType]:
    if value is None:
        return ["float"]
    if not isinstance(value, list) or not value:
        raise _invalid(f"'embedding_types' must be a non-empty list of {', '.join(EMBEDDING_TYPES)}",
                       "embedding_types")
    for item in value:
        if item not in EMBEDDING_TYPES:
            shown = orjson.dumps(item).decode()[:40] if isinstance(item, str | int | float) else _type(item)
            raise _invalid(f"unknown embedding type {shown}; one of {', '.join(EMBEDDING_TYPES)}",
                           "embedding_types")
    return list(dict.fromkeys(value))  # each type once, in the order asked


def parse_cohere_embed(data: Any) -> CohereEmbedCall:
    if not isinstance(data, dict):
        raise _invalid(f"request body must be a JSON object, got {_type(data)}", None)
    texts = _texts(data)
    input_type = _optional(data, "input_type", str)
    if input_type is not None and input_type not in INPUT_TYPES:
        raise _invalid(f"input_type must be one of {', '.join(INPUT_TYPES)}, got '{input_type[:40]}'",
                       "input_type")
    truncate = _optional(data, "truncate", str)
    if truncate is not None and truncate not in TRUNCATE_VALUES:
        raise _invalid(f"truncate must be one of {', '.join(TRUNCATE_VALUES)}, got '{truncate[:40]}'", "truncate")
    return CohereEmbedCall(
        texts=texts, model=_optional(data, "model", str), input_type=input_type,
        embedding_types=_embedding_types(data.get("embedding_types")),
        output_dimension=_optional(data, "output_dimension", int), max_tokens=_optional(data, "max_tokens", int),
        truncate=truncate, types_given=data.get("embedding_types") is not None,
        long_inputs=_optional(data, "long_inputs", str))


def long_input_warnings(truncated: list[int], chunked: dict[int, int]) -> list[str]:
    """meta.warnings (Cohere's field, which its SDK reads) for texts cut or chunked."""
    return [*(f"texts[{index}] was truncated to the token limit" for index in sorted(truncated)),
            *(f"texts[{index}] was embedded in {count} windows, averaged" for index, count in sorted(chunked.items()))]


def encode_cohere_embed(call: CohereEmbedCall, vectors: np.ndarray, tokens: int, *, version: int = 2,
                        warnings: list[str] | None = None, int8_ranges: np.ndarray | None = None) -> bytes:
    """v2 answers by type; v1 too when embedding_types was sent, else a plain list of floats (as Cohere does)."""
    embeddings: Any
    if version == 1 and not call.types_given:
        response_type, embeddings = "embeddings_floats", encode_vectors(vectors, "float")
    else:
        response_type = "embeddings_by_type"
        embeddings = {kind: encode_vectors(vectors, kind, int8_ranges) for kind in call.embedding_types}
    return orjson.dumps({
        "id": str(uuid.uuid4()),
        "response_type": response_type,
        "embeddings": embeddings,
        "texts": call.texts,
        "meta": {"api_version": {"version": str(version)}, "billed_units": {"input_tokens": tokens},
                 **({"warnings": warnings} if warnings else {})},
    }, option=orjson.OPT_SERIALIZE_NUMPY)
