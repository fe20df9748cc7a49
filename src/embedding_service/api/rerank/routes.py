"""Rerank and score handlers: parse, pick the served model, call its engine, encode. No model logic here."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from ... import tracing
from ...engine.multivector import MultiVectorEngine
from ...engine.rerank import RerankEngine, ScoreRequest, ScoreResult
from ...engine.types import EmbedRequest
from ...errors import ErrorKind, ServiceError
from ..body import BodyReader
from ..cohere.errors import cohere_error_docs, cohere_errors_of
from ..embed.protocol import parse_json_body
from ..headers import EMBED_HEADERS, result_headers
from ..middleware.access import CLIENT_ID_KEY
from ..middleware.ratelimit import TOKEN_ADMISSION_KEY
from ..openapi import EMBEDDING_ERRORS, operation_doc
from ..served import ServedModels
from .protocol import (
    RerankBody,
    RerankResponse,
    ScoreBody,
    ScoreResponse,
    encode_rerank,
    encode_score,
    parse_rerank,
    parse_score,
)

__all__ = ["build_rerank_router"]

_JSON = "application/json"



def _timing(result: ScoreResult) -> dict[str, str]:
    return result_headers(result.queue_time_s, result.compute_time_s, result.cache_state)


_RERANK_EXAMPLES = {"rerank": {"summary": "rerank three documents, best two", "value": {
    "query": "What is the capital of China?", "top_n": 2, "return_documents": True,
    "documents": ["Beijing is the capital of China.", "Gravity pulls things down.", {"text": "China is in Asia."}]}}}
_SCORE_EXAMPLES = {"one_to_many": {"summary": "one query against two texts", "value": {
    "text_1": "What is the capital of China?", "text_2": ["Beijing is the capital.", "Gravity pulls."]}}}


def build_rerank_router(models: ServedModels, read_body: BodyReader) -> APIRouter:
    """POST /v1/rerank, /rerank, /v2/rerank and /v1/score. `read_body` applies the content-type and size
    checks the embeddings routes apply."""
    router = APIRouter()

    def _check_ready_first() -> None:  # refuse cheaply, before reading the body
        (models.rerank or models.embed or models.primary).engine.check_ready()

    async def rerank(request: Request) -> Response:
        return await answer_rerank(request)

    async def rerank_v2(request: Request) -> Response:  # Cohere's SDK calls it: errors in Cohere's shape
        return await cohere_errors_of(answer_rerank(request), embed=False)

    async def answer_rerank(request: Request) -> Response:
        _check_ready_first()
        call = parse_rerank(parse_json_body(await read_body(request)))
        served, engine = models.for_rerank(call.model)
        result = await engine.score(ScoreRequest(
            queries=[call.query] * len(call.documents), documents=call.documents, instruction=call.instruction,
            truncate=call.truncate, max_tokens_per_doc=call.max_tokens_per_doc,
            admit=request.scope.get(TOKEN_ADMISSION_KEY), client_id=request.scope.get(CLIENT_ID_KEY)))
        with tracing.span("serialize"):
            body = encode_rerank(call, result.scores, served.name, result.prompt_tokens)
        return Response(body, media_type=_JSON, headers=_timing(result))

    for path, summary in (("/v1/rerank", "Rerank documents against a query (Cohere/Jina/vLLM format)"),
                          ("/rerank", "Rerank documents (alias of /v1/rerank)")):
        router.add_api_route(path, rerank, methods=["POST"], **operation_doc(
            summary, response=RerankResponse, errors=EMBEDDING_ERRORS, body=RerankBody,
            body_examples=_RERANK_EXAMPLES, headers=EMBED_HEADERS, tags=["rerank"]))
    router.add_api_route("/v2/rerank", rerank_v2, methods=["POST"], **operation_doc(
        "Rerank documents (Cohere v2 API, as its SDK calls it; errors in Cohere's shape)", response=RerankResponse,
        body=RerankBody, body_examples=_RERANK_EXAMPLES, headers=EMBED_HEADERS, tags=["rerank"],
        responses=cohere_error_docs("documents[1] is an empty string")))

    async def score(request: Request) -> Response:
        _check_ready_first()
        call = parse_score(parse_json_body(await read_body(request)))
        served = models.for_score(call.model)
        admit = request.scope.get(TOKEN_ADMISSION_KEY)
        if isinstance(served.engine, RerankEngine | MultiVectorEngine):  # a reranker, or MaxSim
            result = await served.engine.score(ScoreRequest(
                queries=call.queries, documents=call.documents, instruction=call.instruction,
                truncate=call.truncate, param="text_2", admit=admit, client_id=request.scope.get(CLIENT_ID_KEY)))
        else:
            result = await _cosine(served.engine, call.queries, call.documents, call, admit,
                                   request.scope.get(CLIENT_ID_KEY))
        return Response(encode_score(result.scores, served.name, result.prompt_tokens), media_type=_JSON,
                        headers=_timing(result))

    router.add_api_route("/v1/score", score, methods=["POST"], **operation_doc(
        "Score text_1 against text_2 (vLLM format): a reranker's score, or the cosine similarity of an "
        "embedding model's vectors", response=ScoreResponse, errors=EMBEDDING_ERRORS, body=ScoreBody,
        body_examples=_SCORE_EXAMPLES, headers=EMBED_HEADERS, tags=["rerank"]))
    return router


async def _cosine(engine: object, queries: list[str], documents: list[str], call: object,
                  admit: Callable[[int], None] | None, client_id: str | None) -> ScoreResult:
    """An embedding model's score of a pair: the cosine of the two unit vectors (vLLM's behaviour)."""
    from ...engine.engine import EmbeddingEngine

    assert isinstance(engine, EmbeddingEngine)
    if getattr(call, "instruction", None) is not None:
        raise ServiceError(ErrorKind.INVALID_REQUEST, "'instruction' applies to rerankers; for an embedding "
                           "model's cosine score, put it in the texts", param="instruction")
    firsts = list(dict.fromkeys(queries))  # 1:N embeds the query once
    texts = firsts + documents
    result = await engine.embed(EmbedRequest(texts=texts, truncate=getattr(call, "truncate", None), admit=admit,
                                             client_id=client_id))
    index = {text: i for i, text in enumerate(firsts)}
    left = result.vectors[[index[q] for q in queries]]
    right = result.vectors[len(firsts):]
    scores = np.einsum("ij,ij->i", left, right).astype(np.float32)
    return ScoreResult(scores, result.prompt_tokens, result.queue_time_s, result.compute_time_s, result.cache_state)
