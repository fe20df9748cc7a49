"""The multi-vector (ColBERT) wire formats: token vectors on `/v1/embeddings` and TEI's `POST /embed_all`.

- /v1/embeddings for a multi-vector model: each item `{"object": "token_embeddings", "index": i, "shape":
  [tokens, dim], "embedding": ...}`; with encoding_format float, a list of `tokens` vectors; with base64, the
  (tokens, dim) matrix row by row as little-endian float32 bytes, or float16 with the extension field
  `"dtype": "float16"` (echoed in the item). OpenAI defines no multi-vector shape.
- /embed_all (TEI): `{"inputs": str | [str], "truncate"?: bool, "prompt_name"?: str}` -> one list of token
  vectors per input. Extensions: `model`, `is_query`, `input_type`.
Query or document: `input_type` search_query / search_document, or `is_query` true / false; with neither, a
query, as PyLate's `encode` (is_query=True) by default.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import Field, StrictBool, StrictStr

from ...engine.types import EmbedRequest
from ...errors import ErrorKind, ServiceError
from ..sparse.protocol import TeiTextsBody, tei_body

__all__ = ["EMBED_ALL_EXAMPLES", "EmbedAllBody", "EmbedAllCall", "encode_openai_multivector", "encode_tei_multivector",
           "parse_embed_all", "parse_vector_dtype", "side_of"]

_SIDES = {"search_query": True, "search_document": False}  # the project's input_type (Cohere's values)
_DTYPES = {"float32": "<f4", "float16": "<f2"}


class EmbedAllBody(TeiTextsBody):
    """The body of POST /embed_all (TEI's)."""

    model: StrictStr | None = Field(None, description="which multi-vector model (its name or an alias)")
    is_query: StrictBool | None = Field(None, description="encode as queries (true, the default: PyLate's) or "
                                        "as documents (false)")
    input_type: Literal["search_query", "search_document"] | None = Field(
        None, description="search_query / search_document: as is_query true / false")


EMBED_ALL_EXAMPLES: dict[str, dict[str, Any]] = {
    "query": {"summary": "a query's token vectors", "value": {"inputs": "What is late interaction?"}},
    "documents": {"summary": "two documents' token vectors", "value": {
        "inputs": ["ColBERT keeps one vector per token.", "MaxSim sums each query token's best match."],
        "is_query": False}},
}


def side_of(is_query: Any, input_type: str | None) -> bool:
    """True for a query, False for a document: from `is_query` and/or `input_type`, which must agree."""
    if is_query is not None and not isinstance(is_query, bool):
        raise ServiceError(ErrorKind.INVALID_REQUEST, "is_query must be true or false", param="is_query")
    if input_type is not None and input_type not in _SIDES:
        raise ServiceError(ErrorKind.INVALID_REQUEST, f"a multi-vector model encodes queries or documents: "
                           f"input_type must be search_query or search_document, got {input_type!r}",
                           param="input_type")
    from_type = _SIDES.get(input_type or "")
    if is_query is not None and from_type is not None and is_query != from_type:
        raise ServiceError(ErrorKind.INVALID_REQUEST, f"is_query {str(is_query).lower()} contradicts input_type "
                           f"{input_type}", param="is_query")
    return next((side for side in (is_query, from_type) if side is not None), True)


def parse_vector_dtype(data: dict[str, Any], encoding: str) -> str:
    """The `dtype` extension of /v1/embeddings: float32 (default) or float16, the latter with base64 only."""
    dtype = data.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise ServiceError(ErrorKind.INVALID_REQUEST, f"dtype must be float32 or float16, got {str(dtype)[:40]!r}",
                           param="dtype")
    if encoding not in ("float", "base64"):
        raise ServiceError(ErrorKind.INVALID_REQUEST, "a multi-vector model's token vectors are float (JSON) or "
                           f"base64; encoding_format {encoding!r} is not served for them", param="encoding_format")
    if dtype == "float16" and encoding != "base64":
        raise ServiceError(ErrorKind.INVALID_REQUEST, "dtype float16 applies to encoding_format base64",
                           param="dtype")
    return str(dtype)


@dataclass
class EmbedAllCall:
    request: EmbedRequest
    model: str | None
    query: bool


def parse_embed_all(data: Any) -> EmbedAllCall:
    """A decoded /embed_all body."""
    body, texts = tei_body(data, EmbedAllBody)
    return EmbedAllCall(EmbedRequest(texts=texts, prompt_name=body.prompt_name, truncate=body.truncate),
                        body.model, side_of(body.is_query, body.input_type))


def encode_tei_multivector(vectors: list[np.ndarray]) -> bytes:
    """TEI's /embed_all answer: for each input, its token vectors."""
    return orjson.dumps(vectors, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_openai_multivector(vectors: list[np.ndarray], encoding: str, dtype: str, model: str,
                              prompt_tokens: int) -> bytes:
    """The /v1/embeddings list with one (tokens, dim) matrix per input, with its shape."""
    data = []
    for n, matrix in enumerate(vectors):
        item: dict[str, Any] = {"object": "token_embeddings", "index": n, "shape": list(matrix.shape)}
        if encoding == "base64":
            item["embedding"] = base64.b64encode(np.ascontiguousarray(matrix, _DTYPES[dtype]).tobytes()).decode()
            item["dtype"] = dtype
        else:
            item["embedding"] = matrix
        data.append(item)
    return orjson.dumps({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}},
                        option=orjson.OPT_SERIALIZE_NUMPY)
