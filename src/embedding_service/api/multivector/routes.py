"""Multi-vector (ColBERT) handlers: TEI's POST /embed_all, and /v1/embeddings when the model asked for is a
multi-vector one (api/multivector/protocol.py has the shapes). MaxSim scoring goes through the rerank routes
(api/rerank/routes.py), which take a multi-vector model as a reranker."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import RootModel

from ..body import BodyReader
from ..embed.protocol import parse_embedding_request, parse_json_body
from ..openapi import EMBEDDING_ERRORS, operation_doc
from ..served import ServedModels
from ..sparse.routes import TIMING, admit_tokens, timing_headers
from .protocol import (
    EMBED_ALL_EXAMPLES,
    EmbedAllBody,
    encode_openai_multivector,
    encode_tei_multivector,
    parse_embed_all,
    parse_vector_dtype,
    side_of,
)

__all__ = ["build_multivector_router", "multivector_embeddings"]

_JSON = "application/json"


class EmbedAllResponse(RootModel[list[list[list[float]]]]):
    """One list of token vectors per input, in input order."""


async def multivector_embeddings(models: ServedModels, request: Request, data: Any) -> Response:
    """/v1/embeddings for a multi-vector model: the same request, each input's token vectors and shape."""
    embed_request, encoding = parse_embedding_request(data)
    dtype = parse_vector_dtype(data, encoding)
    query = side_of(data.get("is_query"), embed_request.input_type)
    named = data.get("model")
    served, engine = models.for_multivector(named if isinstance(named, str) else None)
    admit_tokens(request, embed_request)
    result = await engine.encode(embed_request, query=query)
    return Response(encode_openai_multivector(result.vectors, encoding, dtype, served.name, result.prompt_tokens),
                    media_type=_JSON, headers=timing_headers(result))


def build_multivector_router(models: ServedModels, read_body: BodyReader) -> APIRouter:
    """POST /embed_all. `read_body` applies the content-type and size checks the other routes apply."""
    router = APIRouter()

    async def embed_all(request: Request) -> Response:
        (models.of_task("multivector") or models.all)[0].engine.check_ready()  # cheaply, before the body
        call = parse_embed_all(parse_json_body(await read_body(request)))
        _served, engine = models.for_multivector(call.model)
        admit_tokens(request, call.request)
        result = await engine.encode(call.request, query=call.query)
        return Response(encode_tei_multivector(result.vectors), media_type=_JSON, headers=timing_headers(result))

    router.add_api_route("/embed_all", embed_all, methods=["POST"], **operation_doc(
        "Token vectors of texts (TEI format) from a multi-vector (ColBERT) model, as queries or documents",
        response=EmbedAllResponse, errors=EMBEDDING_ERRORS, body=EmbedAllBody,
        body_examples=EMBED_ALL_EXAMPLES, headers=TIMING, tags=["multivector"]))
    return router
