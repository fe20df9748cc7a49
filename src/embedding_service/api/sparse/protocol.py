"""The sparse-vector wire formats: TEI's `POST /embed_sparse` and the sparse answer of `/v1/embeddings`.

- /embed_sparse (TEI): `{"inputs": str | [str], "truncate"?: bool, "truncation_direction"?: "right",
  "prompt_name"?: str}` -> `[[{"index": i, "value": v}, ...], ...]`, one list per input, by index.
  Extensions: `model` (which sparse model, as on every route) and `top_k`.
- /v1/embeddings for a sparse model: each item `{"object": "sparse_embedding", "index": i, "embedding":
  {"indices": [...], "values": [...]}}`, sorted by index: the shape Qdrant's `SparseVector(indices=, values=)`
  and Milvus' sparse rows take as they are. OpenAI defines no sparse shape, and vLLM answers SPLADE on
  /v1/embeddings with the dense vocabulary-sized vector (30,522 floats); this keeps only the non-zeros.
`top_k` keeps each vector's k largest values: sentence-transformers' `max_active_dims`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)

from ...backends.sparse import SparseVector
from ...engine.types import EmbedRequest
from ...errors import ErrorKind, ServiceError

__all__ = ["SPARSE_EXAMPLES", "SparseBody", "SparseCall", "SparseItem", "SparseResponse", "TeiTextsBody", "check_texts",
           "encode_openai_sparse", "encode_tei_sparse", "parse_sparse", "parse_sparse_options", "tei_body",
           "texts_of"]


# The project's input_type (Cohere's values, engine/input_types.py) to sentence-transformers' routes: a query
# or a document side; classification and clustering are neither (SparseEncoder.encode).
_SIDES: dict[str, str] = {"search_query": "query", "search_document": "document"}


Body = TypeVar("Body", bound=BaseModel)


class TeiTextsBody(BaseModel):
    """The fields TEI's text routes share (/embed_sparse, /embed_all), validated strictly; unknown fields are
    ignored."""

    model_config = ConfigDict(extra="allow")

    inputs: Annotated[Any, WithJsonSchema(TypeAdapter(  # (checked by hand: tei_body)
        Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                         Field(min_length=1)]).json_schema())] = Field(
        ..., description="a text or a list of texts")
    truncate: StrictBool | None = Field(None, description="cut over-long inputs instead of refusing them")
    truncation_direction: Literal["right", "Right"] | None = Field(
        None, description="TEI's; only right (keep the start) is served")
    prompt_name: StrictStr | None = Field(None, description="a sentence-transformers prompt of the model")


class SparseBody(TeiTextsBody):
    """The body of POST /embed_sparse (TEI's)."""

    model: StrictStr | None = Field(None, description="which sparse model (its name or an alias)")
    top_k: StrictInt | None = Field(None, ge=1, description="keep each vector's k largest values")
    return_tokens: StrictBool = Field(False, description="add each entry's vocabulary string (`token`)")
    input_type: Literal["search_query", "search_document", "classification", "clustering"] | None = Field(
        None, description="search_query / search_document: SparseEncoder.encode_query / encode_document (an "
        "inference-free model's query side); otherwise SparseEncoder.encode")


class SparseItem(BaseModel):
    index: int = Field(..., ge=0, description="a vocabulary index (token id)")
    value: float = Field(..., gt=0)
    token: str | None = Field(None, description="its vocabulary string, with return_tokens")


class SparseResponse(RootModel[list[list[SparseItem]]]):
    """One list per input, in input order: its non-zero entries, by index."""


SPARSE_EXAMPLES: dict[str, dict[str, Any]] = {
    "one": {"summary": "one text", "value": {"inputs": "What is SPLADE?"}},
    "batch": {"summary": "two texts, the 32 largest values of each", "value": {
        "inputs": ["What is SPLADE?", "SPLADE is a sparse lexical retrieval model."], "top_k": 32}},
}


def check_texts(texts: list[str], param: str) -> None:
    for index, text in enumerate(texts):
        where = f"{param}[{index}]"
        if not text:
            raise ServiceError(ErrorKind.INVALID_REQUEST, f"{where} is an empty string", param=param)
        if "\x00" in text:
            raise ServiceError(ErrorKind.INVALID_REQUEST, f"{where} contains a NUL character", param=param)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ServiceError(ErrorKind.INVALID_REQUEST, f"{where} is not valid Unicode (lone surrogate)",
                               param=param) from None


def texts_of(inputs: Any) -> list[str]:
    if isinstance(inputs, str):
        return [inputs]
    if not isinstance(inputs, list):
        raise ServiceError(ErrorKind.INVALID_REQUEST, f"'inputs' must be a text or a list of texts, got "
                           f"{type(inputs).__name__}", param="inputs")
    if not inputs:
        raise ServiceError(ErrorKind.INVALID_REQUEST, "'inputs' is an empty list", param="inputs")
    for index, item in enumerate(inputs):
        if not isinstance(item, str):
            raise ServiceError(ErrorKind.INVALID_REQUEST, f"inputs[{index}] is {type(item).__name__}: text only "
                               "(a text or a list of texts)", param="inputs")
    return list(inputs)


@dataclass
class SparseCall:
    """A sparse request: the texts and their options, the model asked for, and the sparse options."""

    request: EmbedRequest
    model: str | None = None
    top_k: int | None = None
    side: str | None = None  # query or document (sentence-transformers' routes), or None: encode()
    return_tokens: bool = False


def tei_body(data: Any, schema: type[Body]) -> tuple[Body, list[str]]:
    """A decoded TEI-style body (`inputs` and options) validated by `schema`, and its texts."""
    if not isinstance(data, dict):
        raise ServiceError(ErrorKind.INVALID_REQUEST, f"request body must be a JSON object, got "
                           f"{type(data).__name__}")
    if data.get("inputs") is None:
        raise ServiceError(ErrorKind.INVALID_REQUEST, "'inputs' is required: a text or a list of texts",
                           param="inputs")
    try:
        body = schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err.get("loc") else None
        raise ServiceError(ErrorKind.INVALID_REQUEST, f"invalid '{field}': {err['msg'].lower()}",
                           param=field) from None
    texts = texts_of(data["inputs"])
    check_texts(texts, "inputs")
    return body, texts


def parse_sparse(data: Any) -> SparseCall:
    """A decoded /embed_sparse body."""
    body, texts = tei_body(data, SparseBody)
    return SparseCall(EmbedRequest(texts=texts, prompt_name=body.prompt_name, truncate=body.truncate),
                      body.model, body.top_k, _SIDES.get(body.input_type or ""), body.return_tokens)


def parse_sparse_options(data: dict[str, Any], request: EmbedRequest) -> SparseCall:
    """The sparse options of a /v1/embeddings body (parsed by parse_embedding_request, its `input_type`
    checked there): `top_k` and `return_tokens` (extension fields), and the side `input_type` selects."""
    value, tokens = data.get("top_k"), data.get("return_tokens", False)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ServiceError(ErrorKind.INVALID_REQUEST, "top_k must be a positive integer", param="top_k")
    if not isinstance(tokens, bool):
        raise ServiceError(ErrorKind.INVALID_REQUEST, "return_tokens must be true or false", param="return_tokens")
    named = data.get("model")
    return SparseCall(request, named if isinstance(named, str) else None, value,
                      _SIDES.get(request.input_type or ""), tokens)


def encode_tei_sparse(vectors: list[SparseVector], tokens: list[list[str]] | None = None) -> bytes:
    """TEI's answer: for each input, its non-zeros as {"index", "value"} objects (and "token"), by index."""
    out = []
    for n, vector in enumerate(vectors):
        pairs = zip(vector.indices.tolist(), vector.values.tolist(), strict=True)
        if tokens is None:
            out.append([{"index": i, "value": v} for i, v in pairs])
        else:
            out.append([{"index": i, "value": v, "token": t} for (i, v), t in zip(pairs, tokens[n], strict=True)])
    return orjson.dumps(out)


def encode_openai_sparse(vectors: list[SparseVector], model: str, prompt_tokens: int,
                         tokens: list[list[str]] | None = None) -> bytes:
    """The /v1/embeddings list with one {"indices", "values"(, "tokens")} object per input."""
    data = [{"object": "sparse_embedding", "index": n,
             "embedding": {"indices": vector.indices.tolist(), "values": vector.values.tolist(),
                           **({"tokens": tokens[n]} if tokens is not None else {})}}
            for n, vector in enumerate(vectors)]
    return orjson.dumps({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})
