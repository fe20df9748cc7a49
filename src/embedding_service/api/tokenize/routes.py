"""POST /tokenize and /detokenize in vLLM's shapes, with exactly the ids the embedding path feeds the model.

/tokenize runs the embeddings' own preparation (engine.token_ids): the prompt an `input_type`, `instruction` or
`prompt_name` adds, the special tokens, the length limit and long-input policy (`long_inputs` / `truncate`, else
the server's): refuse is the same 400, truncate answers the cut ids (`truncated: true`), chunk all the ids in
one piece with `chunks`, the windows embedded (vLLM's /tokenize answers every id whatever the limit). So
`tokens` are what the model sees and `billed_tokens` what /v1/embeddings bills for the same request (equal to
`count` unless chunked, where the prompt and special tokens repeat per window). `add_special_tokens: false`
leaves out the special tokens the tokenizer puts around a text. Token strings and /detokenize need the
backend's tokenizer (torch, openvino and vLLM engines have one; the fake engine has none: 400).
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from ...engine.engine import EmbeddingEngine
from ...engine.input_types import resolve_input_type
from ...engine.types import EmbedRequest
from ...errors import ErrorKind, ServiceError
from ..body import BodyReader
from ..embed.protocol import parse_json_body
from ..openapi import EMBEDDING_ERRORS, operation_doc
from ..served import ServedModels

__all__ = ["DetokenizeBody", "TokenizeBody", "build_tokenize_router"]



class TokenizeBody(BaseModel):
    """POST /tokenize (vLLM's completion form: `prompt`; chat `messages` are not taken)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(..., min_length=1, description="the text, as it would be sent to /v1/embeddings")
    model: str | None = Field(None, description="selects the served embedding model by name")
    add_special_tokens: bool | None = Field(True, description="include the special tokens the tokenizer adds "
                                            "(null: the default, true)")
    return_token_strs: bool | None = Field(False, description="also return each token as the vocabulary spells it")
    input_type: Literal["search_document", "search_query", "classification", "clustering"] | None = Field(
        None, description="as on /v1/embeddings: the model's prompt for that use")
    instruction: str | None = Field(None, description="as on /v1/embeddings: a Qwen3 query instruction")
    prompt_name: str | None = Field(None, description="as on /v1/embeddings: a sentence-transformers prompt")
    truncate: bool | None = Field(None, description="as on /v1/embeddings: cut over-long input instead of 400")
    long_inputs: Literal["refuse", "truncate", "chunk"] | None = Field(
        None, description="as on /v1/embeddings: over-long input refused (400), truncated (the cut ids), or chunked "
        "(all ids in one piece, and how many windows); default: the server's long_inputs")


class TokenizeResponse(BaseModel):
    count: int = Field(..., ge=0, description="len(tokens)")
    max_model_len: int = Field(..., ge=1)
    tokens: list[int]
    token_strs: list[str] | None = None
    truncated: bool = Field(False, description="extension: the text was over the limit and `tokens` are its ids "
                            "as cut (what the model sees)")
    chunks: int = Field(1, ge=1, description="extension: how many windows the embedding path embeds (over 1 only "
                        "when chunked: `tokens` are then the whole input's ids, prompt and special tokens once)")
    billed_tokens: int = Field(..., ge=0, description="extension: the tokens /v1/embeddings counts in usage for "
                               "the same request (a chunked input's prompt and special tokens once per window)")


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    tokens: list[int] = Field(..., description="token ids of the served model's tokenizer")
    model: str | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


def _invalid(message: str, param: str | None) -> ServiceError:
    return ServiceError(ErrorKind.INVALID_REQUEST, message, param=param)


def _field(data: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise _invalid(f"'{name}' must be {'a boolean' if kind is bool else 'a string'}, got "
                       f"{type(value).__name__}", name)
    return value


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _invalid(f"request body must be a JSON object, got {type(data).__name__}", None)
    return data


def _decoder(engine: EmbeddingEngine, param: str) -> Any:
    decoder = getattr(engine.backend, "decoder", None)
    if decoder is None:
        raise _invalid(f"this engine ({engine.info.engine if engine.info else 'loading'}) cannot turn ids back "
                       "into text", param)
    return decoder


def _strip_specials(ids: list[int], prefix: tuple[int, ...], suffix: tuple[int, ...]) -> list[int]:
    start = len(prefix) if prefix and tuple(ids[: len(prefix)]) == prefix else 0
    end = len(ids) - len(suffix) if suffix and tuple(ids[len(ids) - len(suffix):]) == suffix else len(ids)
    return ids[start:end]


def build_tokenize_router(models: ServedModels, read_body: BodyReader, *, input_type_strict: bool) -> APIRouter:
    """POST /tokenize and /detokenize, on the embedding model a request names (or the default one)."""
    router = APIRouter()

    def _engine(data: dict[str, Any]) -> EmbeddingEngine:
        return models.for_embed(_field(data, "model", str))[1]

    def _check_ready_first() -> None:  # refuse cheaply, before reading the body
        models.primary.engine.check_ready()

    async def tokenize(request: Request) -> Response:
        _check_ready_first()
        data = _object(parse_json_body(await read_body(request)))
        if data.get("messages") is not None:
            raise _invalid("'messages' (chat) is not taken here: send the text as 'prompt'", "messages")
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise _invalid("'prompt' is required: a non-empty string", "prompt")
        engine = _engine(data)
        info = engine.check_ready()
        given = _field(data, "instruction", str)
        if given is not None and not given.strip():
            raise _invalid("'instruction' is empty", "instruction")
        instruction, prompt_name = resolve_input_type(
            _field(data, "input_type", str), instruction=given,
            prompt_name=_field(data, "prompt_name", str), prompts=info.prompts, strict=input_type_strict)
        seqs, limit, prepared = await engine.token_ids(EmbedRequest(
            texts=[prompt], instruction=instruction, prompt_name=prompt_name,
            truncate=_field(data, "truncate", bool), long_inputs=_field(data, "long_inputs", str)))
        ids = seqs[0]
        if not _field(data, "add_special_tokens", bool, True):
            ids = _strip_specials(ids, info.special_prefix, info.special_suffix)
        body: dict[str, Any] = {"count": len(ids), "max_model_len": limit, "tokens": ids, "token_strs": None,
                                "truncated": bool(prepared.truncated),
                                "chunks": prepared.windows[0].count if prepared.windows else 1,
                                "billed_tokens": prepared.total}
        if _field(data, "return_token_strs", bool, False):
            body["token_strs"] = _decoder(engine, "return_token_strs").token_strs(ids)
        return Response(orjson.dumps(body), media_type="application/json")

    async def detokenize(request: Request) -> Response:
        _check_ready_first()
        data = _object(parse_json_body(await read_body(request)))
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise _invalid("'tokens' is required: a list of integer token ids", "tokens")
        engine = _engine(data)
        info = engine.check_ready()
        bad = next((i for i, t in enumerate(tokens) if not 0 <= t < info.vocab_size), None)
        if bad is not None:
            raise _invalid(f"tokens[{bad}] = {tokens[bad]} is not an id of this model's vocabulary "
                           f"(0..{info.vocab_size - 1})", "tokens")
        text = _decoder(engine, "tokens").decode(tokens)
        return Response(orjson.dumps({"prompt": text}), media_type="application/json")

    router.add_api_route("/tokenize", tokenize, methods=["POST"], **operation_doc(
        "Token ids of a text, as the embedding path feeds them to the model (vLLM's shape)",
        response=TokenizeResponse, errors=EMBEDDING_ERRORS, body=TokenizeBody, tags=["tokens"],
        body_examples={"query": {"summary": "a query with its input_type", "value": {
            "prompt": "What is the capital of China?", "input_type": "search_query"}}}))
    router.add_api_route("/detokenize", detokenize, methods=["POST"], **operation_doc(
        "The text of token ids (vLLM's shape)", response=DetokenizeResponse, errors=EMBEDDING_ERRORS,
        body=DetokenizeBody, tags=["tokens"],
        body_examples={"ids": {"summary": "token ids", "value": {"tokens": [101, 7592, 102]}}}))
    return router
