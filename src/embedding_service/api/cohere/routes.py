"""POST /v2/embed and /v1/embed, Cohere's embed: parse, pick the embedding model, embed, encode each type asked."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ... import tracing
from ...engine.input_types import resolve_input_type
from ...engine.types import EmbedRequest
from ..body import BodyReader
from ..embed.protocol import parse_json_body
from ..headers import EMBED_HEADERS, embed_headers
from ..middleware.access import CLIENT_ID_KEY
from ..middleware.ratelimit import TOKEN_ADMISSION_KEY
from ..openapi import operation_doc
from ..served import ServedModels
from .errors import cohere_error_docs, cohere_errors_of
from .protocol import (
    CohereEmbedBody,
    CohereEmbedCall,
    CohereEmbedResponse,
    CohereEmbedV1Response,
    encode_cohere_embed,
    long_input_warnings,
    parse_cohere_embed,
)

__all__ = ["build_cohere_router"]



_EXAMPLES = {
    "query": {"summary": "a search query, float and int8", "value": {
        "texts": ["What is the capital of China?"], "input_type": "search_query",
        "embedding_types": ["float", "int8"]}},
    "documents": {"summary": "documents as binary vectors", "value": {
        "texts": ["Beijing is the capital of China.", "Gravity pulls things down."],
        "input_type": "search_document", "embedding_types": ["ubinary"]}},
}


def _engine_request(call: CohereEmbedCall, instruction: str | None, prompt_name: str | None) -> EmbedRequest:
    return EmbedRequest(texts=call.texts, instruction=instruction, prompt_name=prompt_name,
                        dimensions=call.output_dimension, max_tokens=call.max_tokens,
                        truncate=None if call.truncate is None else call.truncate != "NONE",
                        truncate_start=call.truncate == "START", long_inputs=call.long_inputs)


def build_cohere_router(models: ServedModels, read_body: BodyReader, *, input_type_strict: bool) -> APIRouter:
    """POST /v2/embed and /v1/embed. `read_body` applies the embeddings routes' content-type and size checks."""
    router = APIRouter()

    async def answer(request: Request, version: int) -> Response:
        models.primary.engine.check_ready()  # refuse cheaply, before reading the body
        call = parse_cohere_embed(parse_json_body(await read_body(request)))
        _, engine = models.for_embed(call.model)
        with engine.accepted() as info:
            instruction, prompt_name = resolve_input_type(call.input_type, instruction=None, prompt_name=None,
                                                          prompts=info.prompts, strict=input_type_strict)
            embed_request = _engine_request(call, instruction, prompt_name)
            embed_request.request_id = request.headers.get("x-request-id")
            embed_request.client_id = request.scope.get(CLIENT_ID_KEY)  # (a per-key result cache)
            admission = request.scope.get(TOKEN_ADMISSION_KEY)  # token rate limit, if on
            if admission is not None:
                admission.check()
                embed_request.admit, embed_request.charge_refused = admission, admission.charge
            result = await engine.embed_accepted(embed_request, info)
        with tracing.span("serialize"):
            body = encode_cohere_embed(call, result.vectors, result.prompt_tokens, version=version,
                                       int8_ranges=info.int8_ranges,
                                       warnings=long_input_warnings(result.truncated, result.chunked))
        return Response(body, media_type="application/json", headers=embed_headers(result))

    async def embed(request: Request) -> Response:
        return await cohere_errors_of(answer(request, 2))

    async def embed_v1(request: Request) -> Response:
        return await cohere_errors_of(answer(request, 1))

    for path, endpoint, response, summary in (
            ("/v2/embed", embed, CohereEmbedResponse, "Create embeddings (Cohere embed v2, as its SDK calls it): "
                                                      "float, int8, uint8, binary, ubinary, base64"),
            ("/v1/embed", embed_v1, CohereEmbedV1Response, "Create embeddings (Cohere embed v1: cohere.Client, "
             "LangChain's CohereEmbeddings); plain floats unless embedding_types is sent")):
        router.add_api_route(path, endpoint, methods=["POST"], **operation_doc(
            summary, response=response, body=CohereEmbedBody, body_examples=_EXAMPLES, headers=EMBED_HEADERS,
            responses=cohere_error_docs("texts[0] is an empty string"), tags=["embeddings"]))
    return router
