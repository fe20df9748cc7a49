"""Response shapes, as pydantic models: what /openapi.json documents and what the tests validate against.

The handlers build their bodies with orjson straight from numpy (no model per response, for speed); the
schemathesis test checks every answer against these models, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine.types import EngineState

__all__ = [
    "EmbeddingObject",
    "EmbeddingResponse",
    "ErrorDetail",
    "ErrorResponse",
    "Health",
    "ModelCard",
    "ModelHealth",
    "ModelList",
    "ServiceInfo",
    "Usage",
]

_SPEC_MODEL = "Qwen/Qwen3-Embedding-0.6B"


class Usage(BaseModel):
    prompt_tokens: int = Field(..., ge=0, description="tokens of all inputs, prompts included")
    total_tokens: int = Field(..., ge=0)


class EmbeddingObject(BaseModel):
    object: Literal["embedding"]
    index: int = Field(..., ge=0, description="position of the input this vector belongs to")
    embedding: list[float] | str = Field(
        ..., description="the vector; with encoding_format=base64, its little-endian float32 bytes in base64"
    )


class EmbeddingResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0123, -0.0456, 0.0789]}],
        "model": _SPEC_MODEL,
        "usage": {"prompt_tokens": 10, "total_tokens": 10},
    }]})

    object: Literal["list"]
    data: list[EmbeddingObject]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    task: Literal["embed", "rerank", "sparse", "multivector"] | None = Field(None, description="what the model serves")
    aliases: list[str] | None = Field(None, description="other names the model answers to")
    max_model_len: int | None = Field(None, description="longest input in tokens (null while loading)")
    dimensions: int | None = Field(None, description="an embedding model's vector size (once loaded)")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ModelHealth(BaseModel):
    model: str
    task: Literal["embed", "rerank", "sparse", "multivector"]
    status: EngineState
    engine: str | None
    device: str | None
    dtype: str | None
    max_model_len: int | None


class Health(BaseModel):
    """The spec's health body, plus what the engine reports once loaded (null before)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "status": "healthy", "model": _SPEC_MODEL, "gpu_memory_utilization": 0.4, "max_model_len": 3072,
        "device": "cuda", "engine": "vllm", "dtype": "float16", "dimension": 1024,
    }]})

    status: EngineState
    model: str
    gpu_memory_utilization: float
    max_model_len: int
    device: str | None
    engine: str | None
    dtype: str | None
    dimension: int | None
    models: list[ModelHealth] | None = Field(
        None, description="every model served (the embedding model and the reranker), each with its state")


class Liveness(BaseModel):
    status: Literal["alive"]


class Readiness(BaseModel):
    status: Literal["ready", "loading", "draining", "unhealthy"] = Field(
        description="ready when every model is loaded and the server is not draining")
    models: dict[str, EngineState] = Field(description="each served model's state, by name")


class ServiceInfo(BaseModel):
    name: str
    version: str
    model: str
    status: EngineState
    engine: str | None
    dimension: int | None
    endpoints: list[str]


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(..., min_length=1, description="what went wrong and what to do about it")
    type: str = Field(..., description="OpenAI error type, e.g. invalid_request_error")
    param: str | None = Field(..., description="the request field at fault, if one is")
    code: str | None = Field(..., description="a stable machine-readable code")


class ErrorResponse(BaseModel):
    """The OpenAI error envelope: every 4xx and 5xx answer has this body."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail
