"""Sparse-vector handlers: TEI's POST /embed_sparse, and /v1/embeddings when the model asked for is sparse
(api/sparse/protocol.py has the shapes). Parse, pick the served model, call its engine, encode."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ...engine.multivector import MultiVectorResult
from ...engine.sparse import SparseResult
from ...engine.types import EmbedRequest
from ...errors import ErrorKind, ServiceError
from ..body import BodyReader
from ..embed.protocol import parse_embedding_request, parse_json_body
from ..headers import EMBED_HEADERS, result_headers
from ..middleware.access import CLIENT_ID_KEY
from ..middleware.ratelimit import TOKEN_ADMISSION_KEY
from ..openapi import EMBEDDING_ERRORS, header, operation_doc
from ..served import Served, ServedModels
from .protocol import (
    SPARSE_EXAMPLES,
    SparseBody,
    SparseResponse,
    encode_openai_sparse,
    encode_tei_sparse,
    parse_sparse,
    parse_sparse_options,
)

__all__ = ["TIMING", "admit_tokens", "build_sparse_router", "sparse_embeddings", "timing_headers"]

_JSON = "application/json"
_MS = r"^[0-9]+\.[0-9]{2}$"
TIMING = {"X-Queue-Time-Ms": header("milliseconds queued for a batch", pattern=_MS),
           "X-Inference-Time-Ms": header("milliseconds of model compute", pattern=_MS)}



def timing_headers(result: SparseResult | MultiVectorResult) -> dict[str, str]:
    """Timing, and (a sparse model's) what the result cache answered: multi-vector models have no cache."""
    state = result.cache_state if isinstance(result, SparseResult) else None
    return result_headers(result.queue_time_s, result.compute_time_s, state)


def admit_tokens(request: Request, embed_request: EmbedRequest) -> None:
    """The token rate limit, if on: a client in debt is refused before its texts are tokenised."""
    admission = request.scope.get(TOKEN_ADMISSION_KEY)
    if admission is not None:
        admission.check()
        embed_request.admit, embed_request.charge_refused = admission, admission.charge


async def sparse_embeddings(models: ServedModels, request: Request, data: Any) -> Response:
    """/v1/embeddings for a sparse model: the same request, each vector as {"indices", "values"}."""
    embed_request, encoding = parse_embedding_request(data)
    if encoding != "float":
        raise ServiceError(ErrorKind.INVALID_REQUEST, "a sparse model's vectors are JSON indices and values: "
                           "encoding_format must be 'float' (or omitted)", param="encoding_format")
    call = parse_sparse_options(data, embed_request)
    served, engine = models.for_sparse(call.model)
    admit_tokens(request, embed_request)
    embed_request.client_id = request.scope.get(CLIENT_ID_KEY)  # (a per-key result cache)
    result = await engine.encode(embed_request, top_k=call.top_k, side=call.side, return_tokens=call.return_tokens)
    return Response(encode_openai_sparse(result.vectors, served.name, result.prompt_tokens, result.tokens),
                    media_type=_JSON, headers=timing_headers(result))


def build_sparse_router(models: ServedModels, read_body: BodyReader) -> APIRouter:
    """POST /embed_sparse. `read_body` applies the content-type and size checks the other routes apply."""
    router = APIRouter()

    async def embed_sparse(request: Request) -> Response:
        primary: Served = (models.of_task("sparse") or models.all)[0]
        primary.engine.check_ready()  # refuse cheaply, before reading the body
        call = parse_sparse(parse_json_body(await read_body(request)))
        _served, engine = models.for_sparse(call.model)
        admit_tokens(request, call.request)
        call.request.client_id = request.scope.get(CLIENT_ID_KEY)  # (a per-key result cache)
        result = await engine.encode(call.request, top_k=call.top_k, side=call.side,
                                     return_tokens=call.return_tokens)
        return Response(encode_tei_sparse(result.vectors, result.tokens), media_type=_JSON,
                        headers=timing_headers(result))

    router.add_api_route("/embed_sparse", embed_sparse, methods=["POST"], **operation_doc(
        "Sparse (SPLADE) vectors of texts (TEI format): each input's non-zero vocabulary entries, by index",
        response=SparseResponse, errors=EMBEDDING_ERRORS, body=SparseBody,
        body_examples=SPARSE_EXAMPLES, headers=EMBED_HEADERS, tags=["sparse"]))
    return router
