"""POST /v1/embeddings (and the spec's /embeddings): parse, pick the model, embed, encode. Sparse and multi-vector
models answer through their own task's handler; no model logic lives here."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ... import tracing
from ...engine.input_types import resolve_input_type
from ...engine.types import MULTIVECTOR, SPARSE
from ..body import read_json_body
from ..context import ServiceContext
from ..headers import EMBED_HEADERS, embed_headers
from ..middleware.access import CLIENT_ID_KEY
from ..middleware.ratelimit import TOKEN_ADMISSION_KEY
from ..multivector.routes import multivector_embeddings
from ..openapi import EMBEDDING_ERRORS, operation_doc
from ..schemas import EmbeddingResponse
from ..sparse.routes import sparse_embeddings
from .protocol import (
    EMBEDDING_EXAMPLES,
    EmbeddingRequest,
    encode_embeddings,
    parse_embedding_request,
    parse_json_body,
)

__all__ = ["build_embed_router"]

_JSON = "application/json"


def build_embed_router(ctx: ServiceContext) -> APIRouter:
    router = APIRouter()

    async def embeddings(request: Request) -> Response:
        with ctx.engine.accepted():  # accepted from here: a drain waits for the body to arrive
            data = parse_json_body(await read_json_body(request, ctx.options.max_body_bytes))
            named = data.get("model") if isinstance(data, dict) else None
            task = ctx.served.task_for_embeddings(named if isinstance(named, str) else None)
            if task == SPARSE:
                return await sparse_embeddings(ctx.served, request, data)
            if task == MULTIVECTOR:
                return await multivector_embeddings(ctx.served, request, data)
            # The model asked for (404 for an unknown name among several, 400 for a reranker's name).
            chosen, engine = ctx.served.for_embed(named if isinstance(named, str) else None)
            decoder = ctx.token_ids_decoder
            embed_request, encoding = parse_embedding_request(data, token_ids_are_text=decoder is not None)
            if decoder is not None:
                embed_request = decoder.to_text(embed_request)
            embed_request.request_id = request.headers.get("x-request-id")
            embed_request.client_id = request.scope.get(CLIENT_ID_KEY)  # (a per-key result cache)
            admission = request.scope.get(TOKEN_ADMISSION_KEY)  # token rate limit, if on
            if admission is not None:
                admission.check()  # a client in debt is refused before its texts are tokenised
                embed_request.admit, embed_request.charge_refused = admission, admission.charge
            with engine.accepted(admitted=True) as info:  # (accepted above, before its body)
                embed_request.instruction, embed_request.prompt_name = resolve_input_type(  # the chosen model's
                    embed_request.input_type, instruction=embed_request.instruction,
                    prompt_name=embed_request.prompt_name, prompts=info.prompts,
                    strict=ctx.options.input_type_strict)
                if tracing.TRACER is not None:
                    tracing.set_attributes({"embedding.model": chosen.name, "embedding.texts": embed_request.count})
                result = await engine.embed_accepted(embed_request, info)
        with tracing.span("serialize") as traced:
            body = encode_embeddings(result.vectors, encoding, chosen.name, result.prompt_tokens, info.int8_ranges)
            if traced is not None:
                traced.set_attributes({"embedding.encoding": encoding, "embedding.bytes": len(body)})
        return Response(body, media_type=_JSON, headers=embed_headers(result))

    for path, summary in (("/v1/embeddings", "Create embeddings (OpenAI format)"),
                          ("/embeddings", "Create embeddings (the same, at the spec's short path)")):
        router.add_api_route(path, embeddings, methods=["POST"], **operation_doc(
            summary, response=EmbeddingResponse, errors=EMBEDDING_ERRORS, body=EmbeddingRequest,
            body_examples=EMBEDDING_EXAMPLES, headers=EMBED_HEADERS, tags=["embeddings"]))
    return router
