"""The OpenAI embeddings wire format: request parsing with clear errors, and fast response encoding."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)

from ...engine.input_types import INPUT_TYPES
from ...engine.types import EmbedRequest
from ...errors import ErrorKind, ServiceError
from ...vector_types import EMBEDDING_TYPES, encode_vectors

__all__ = ["EMBEDDING_EXAMPLES", "EmbeddingRequest", "encode_embeddings", "parse_embedding_request", "parse_json_body"]

_DECODER = msgspec.json.Decoder()
# A high surrogate escape not followed by a low one (a pair is one character).
_LONE_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})")

NonEmptyText = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
_DocumentedInput = NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)] | TokenIds | Annotated[
    list[TokenIds], Field(min_length=1)
]


def _documents(doc_type: Any) -> WithJsonSchema:
    """Publish `doc_type`'s schema for a field validated only for its type here: the rest of the rule is
    checked by hand below, with a message a person can act on."""
    return WithJsonSchema(TypeAdapter(doc_type).json_schema())


class EmbeddingRequest(BaseModel):
    """The body of POST /v1/embeddings: the documented schema, and strict validation of the option types (no
    silent coercion of "5" to 5). `input` and the options' ranges are checked by hand (parse_embedding_request);
    schemathesis checks that the route rejects what this schema rules out.
    Unknown fields (`user`, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    input: Annotated[Any, _documents(_DocumentedInput)] = Field(
        ..., description="text, list of texts, token ids, or list of token-id lists"
    )
    model: StrictStr | None = Field(None, description="accepted, not used to select anything (one model is served)")
    encoding_format: Annotated[StrictStr | None, _documents(
        Literal["float", "base64", "int8", "uint8", "binary", "ubinary"] | None)] = Field(
        "float", description="float: a JSON array; base64: little-endian float32 bytes (the OpenAI SDK's default); "
        "int8, uint8, binary, ubinary: integer arrays, as Cohere's embedding_types (docs/clients.md)"
    )
    dimensions: Annotated[StrictInt | None, _documents(Annotated[int, Field(ge=1)] | None)] = Field(
        None, description="Matryoshka models only: output size"
    )
    instruction: Annotated[StrictStr | None, _documents(Annotated[str, Field(pattern=r"\S")] | None)] = Field(
        None, description="Qwen3 task instruction for queries (text input only)"
    )
    prompt_name: StrictStr | None = Field(None, description="a sentence-transformers prompt of the model")
    input_type: Annotated[StrictStr | None, _documents(
        Literal["search_document", "search_query", "classification", "clustering"] | None)] = Field(
        None, description="Cohere's input_type: the model's prompt or instruction for that use (docs/clients.md)")
    truncate: StrictBool | None = Field(None, description="truncate over-long inputs instead of failing")
    long_inputs: Annotated[StrictStr | None, _documents(Literal["refuse", "truncate", "chunk"] | None)] = Field(
        None, description="inputs over the model's limit: refuse (400), truncate, or chunk (embed windows and "
        "average them); default: the server's long_inputs. The X-Truncated-Inputs / X-Chunked-Inputs headers "
        "say which inputs were cut or chunked")
    user: StrictStr | None = None


# Request examples for the API reference, from the product spec (its quick start and client examples).
EMBEDDING_EXAMPLES: dict[str, dict[str, Any]] = {
    "single": {"summary": "one text", "value": {"input": "Hello, world!"}},
    "batch": {"summary": "a batch of texts", "value": {
        "input": ["Hello, world!", "Embeddings turn text into vectors.", "Batching on the client is faster."]}},
    "instruction": {"summary": "a query with a Qwen3 task instruction", "value": {
        "input": ["What is the capital of China?"],
        "instruction": "Given a web search query, retrieve relevant passages"}},
    "base64": {"summary": "base64-encoded float32 (what the OpenAI SDK asks for)", "value": {
        "input": ["Hello, world!"], "encoding_format": "base64"}},
    "dimensions": {"summary": "a shorter Matryoshka vector (Qwen3-Embedding)", "value": {
        "input": "Hello, world!", "dimensions": 256}},
}


def parse_json_body(body: bytes | bytearray) -> Any:
    """A request body decoded by msgspec, with one 400 per way it can be bad.

    Not orjson: its parser (yyjson) maps a document buffer of ~12x the body for each parse (187 MB for a
    15.6 MB body) and touches ~one page per byte of string, so a 15.6 MB body cost 16-17 ms on the event loop,
    half of it page faults, on every parse; msgspec builds the objects directly in ~5 ms (bench/RESULTS.md,
    "Refused bodies"). Its nesting is bounded by the interpreter's recursion limit (orjson's was 1024).
    """
    if not body:
        raise ServiceError(ErrorKind.INVALID_REQUEST,
                           "request body is empty; send a JSON object with 'input'")
    text: bytes | bytearray | memoryview = body
    if body.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (some editors): RFC 8259 lets us ignore it
        text = memoryview(body)[3:]  # (a view: no copy of the body)
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise ServiceError(ErrorKind.INVALID_REQUEST, "request body is nested too deeply; send a JSON object "
                           "with 'input'") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:  # (a number out of range is a ValidationError)
        detail = str(exc)
    if "UTF-8" in detail:
        message = "request body is not valid UTF-8; send JSON encoded as UTF-8"
    elif "surrogate" in detail or ("truncated" in detail and _LONE_HIGH_SURROGATE.search(text)):
        # (msgspec calls a lone high surrogate before a plain character "truncated")
        message = (f"request body holds a lone surrogate escape such as \\ud800 ({detail}); "
                   "strings must be valid Unicode")
    else:
        message = f"request body is not valid JSON: {detail}"
    raise ServiceError(ErrorKind.INVALID_REQUEST, message)


def _preview(value: Any) -> str:
    """A short echo of a rejected option. Containers are named, not dumped: a value nested 300 deep made
    orjson's serializer fail (a 500 with a traceback instead of this 400)."""
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a JSON array"
    return orjson.dumps(value).decode()[:80]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_input(value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    if isinstance(value, str):
        if not value:
            raise ServiceError(ErrorKind.INVALID_REQUEST, "'input' is an empty string", param="input")
        return [value], None
    if not isinstance(value, list):
        raise ServiceError(ErrorKind.INVALID_REQUEST,
                           "'input' must be a string, a list of strings, or token ids; "
                           f"got {type(value).__name__}", param="input")
    if not value:
        raise ServiceError(ErrorKind.INVALID_REQUEST, "'input' is an empty list", param="input")
    first = value[0]
    if isinstance(first, str):
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise ServiceError(ErrorKind.INVALID_REQUEST,
                                   f"input[{index}] is {type(item).__name__}; all items must be strings",
                                   param="input")
            if not item:
                raise ServiceError(ErrorKind.INVALID_REQUEST, f"input[{index}] is an empty string",
                                   param="input")
        return list(value), None
    if _is_int(first):
        if not all(_is_int(item) for item in value):
            raise ServiceError(ErrorKind.INVALID_REQUEST, "a token-id input must contain only integers",
                               param="input")
        return None, [list(value)]
    if isinstance(first, list):
        for index, item in enumerate(value):
            if not isinstance(item, list) or not all(_is_int(tok) for tok in item):
                raise ServiceError(ErrorKind.INVALID_REQUEST,
                                   f"input[{index}] must be a list of integer token ids", param="input")
            if not item:
                raise ServiceError(ErrorKind.INVALID_REQUEST, f"input[{index}] is an empty token list",
                                   param="input")
        return None, [list(item) for item in value]
    raise ServiceError(ErrorKind.INVALID_REQUEST,
                       f"input[0] is {type(first).__name__}; expected a string or token ids", param="input")


def _check_text(texts: list[str]) -> None:
    # (Lone surrogates need no check: the parser refuses them, escaped or raw, so every text here encodes.)
    for index, text in enumerate(texts):
        if "\x00" in text:
            raise ServiceError(ErrorKind.INVALID_REQUEST, f"input[{index}] contains a NUL character",
                               param="input")


def _check_token_id_options(options: EmbeddingRequest) -> None:
    # A prompt is text; prepending its tokens to ids would not match how the text tokenizes. Say so.
    for name in ("instruction", "prompt_name", "input_type"):
        if getattr(options, name) is not None:
            raise ServiceError(ErrorKind.INVALID_REQUEST,
                               f"'{name}' applies to text input only; send the text instead of token ids",
                               param=name)


def parse_embedding_request(data: Any, *, token_ids_are_text: bool = False) -> tuple[EmbedRequest, str]:
    """Validate a JSON body decoded by `parse_json_body`. Returns the engine request and the encoding format.

    `token_ids_are_text`: token ids will be decoded to text (tiktoken mode), so prompts may apply to them.
    """
    if not isinstance(data, dict):
        raise ServiceError(ErrorKind.INVALID_REQUEST,
                           f"request body must be a JSON object, got {type(data).__name__}")
    if "input" not in data or data["input"] is None:
        raise ServiceError(ErrorKind.INVALID_REQUEST, "'input' is required", param="input")
    try:
        options = EmbeddingRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err.get("loc") else None
        got = _preview(err.get("input"))
        raise ServiceError(ErrorKind.INVALID_REQUEST, f"invalid '{field}': {err['msg'].lower()}, got {got}",
                           param=field) from None
    fmt = "float" if options.encoding_format is None else options.encoding_format  # null means the default
    if fmt not in EMBEDDING_TYPES:
        raise ServiceError(ErrorKind.INVALID_REQUEST,
                           f"encoding_format must be one of {', '.join(EMBEDDING_TYPES)}, got '{fmt[:40]}'",
                           param="encoding_format")
    if options.input_type is not None and options.input_type not in INPUT_TYPES:
        raise ServiceError(ErrorKind.INVALID_REQUEST, f"input_type must be one of {', '.join(INPUT_TYPES)}, "
                           f"got '{options.input_type[:40]}'", param="input_type")
    if options.instruction is not None and not options.instruction.strip():
        raise ServiceError(ErrorKind.INVALID_REQUEST, "'instruction' is empty", param="instruction")
    texts, token_ids = _parse_input(data["input"])
    if texts is not None:
        _check_text(texts)
    elif not token_ids_are_text:
        _check_token_id_options(options)
    request = EmbedRequest(
        texts=texts,
        token_ids=token_ids,
        instruction=options.instruction,
        prompt_name=options.prompt_name,
        input_type=options.input_type,
        dimensions=options.dimensions,
        truncate=options.truncate,
        long_inputs=options.long_inputs,
        token_ids_flat=token_ids is not None and _is_int(data["input"][0]),
    )
    if options.dimensions is not None and options.dimensions < 1:
        raise ServiceError(ErrorKind.INVALID_REQUEST,
                           f"dimensions must be a positive integer, got {options.dimensions}",
                           param="dimensions")
    return request, fmt


def encode_embeddings(vectors: np.ndarray, encoding_format: str, model: str, prompt_tokens: int,
                      int8_ranges: np.ndarray | None = None) -> bytes:
    """The response body, serialised straight from numpy (no Python float lists); `int8_ranges`: the model's
    (BackendInfo.int8_ranges)."""
    rows = encode_vectors(vectors, encoding_format, int8_ranges)  # type: ignore[arg-type]  # (checked by the parser)
    data = [{"object": "embedding", "index": i, "embedding": rows[i]} for i in range(len(vectors))]
    body = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)

