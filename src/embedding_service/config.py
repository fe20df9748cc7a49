"""Service configuration: the spec's `EmbeddingConfig`, read from CLI flags, `EMBEDDING_*` env and `.env`.

Precedence, highest first: values passed to the constructor (the CLI does this), environment variables,
the `.env` file, then the class defaults (which `config/embedding_config.py` lets a user edit).
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .config_values import UNUSABLE_KEY, split_json_or_csv, usable_api_key

__all__ = ["DEFAULT_MODEL", "DEMO_MODEL_NAME", "UNUSABLE_KEY", "EmbeddingConfig", "usable_api_key"]

DEFAULT_MODEL = "Qwen/Qwen3-Embedding-0.6B"
DEMO_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

# Flags that name a model: with a models file (models_file.py), the file names every model.
MODEL_FLAGS = ("model_path", "demo", "served_model_name", "rerank_model", "rerank_model_path",
               "served_rerank_model_name", "rerank_only")

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class EmbeddingConfig(BaseSettings):
    """Every knob of the service. Field names and defaults of the spec are a contract."""

    model_config = SettingsConfigDict(
        env_prefix="EMBEDDING_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        validate_assignment=True,
    )

    # --- the spec's fields -------------------------------------------------------------------------
    model_name: str = Field(DEFAULT_MODEL, description="Hugging Face model id")
    model_path: str | None = Field(None, description="local model directory; wins over model_name")
    gpu_memory_utilization: float = Field(0.4, gt=0.0, le=1.0,
                                          description="fraction of GPU memory vLLM may take (0.0-1.0]")
    max_model_len: int = Field(3072, ge=8, le=1_048_576, description="maximum input length in tokens")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="number of GPUs")
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16",
        description="float16, bfloat16 or float32 (on a CPU float16 runs as bf16 or fp32)")
    host: str = Field("0.0.0.0", description="listen address")
    port: int = Field(8890, ge=1, le=65535, description="listen port")
    workers: int = Field(1, ge=1, le=64, description="server processes, each with its own engine")
    api_processes: int = Field(1, ge=1, le=64, description="HTTP processes in front of one engine (docs/ops.md)")
    max_batch_size: int = Field(32, ge=1, le=4096, description="largest batch, in texts")
    batch_timeout_ms: float = Field(
        10.0, ge=0.0, le=10_000.0,
        description="longest wait to fill a batch: while the engine is busy or requests are on their way "
        "(a lone client never waits)",
    )
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL")

    # --- engine selection ----------------------------------------------------------------------------
    engine: Literal["auto", "torch", "vllm", "openvino", "fake"] = Field("auto",
        description="auto picks vLLM where installed and usable, else torch (openvino if quantize is set)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses CUDA when available")
    served_model_name: str | None = Field(None, description="name reported to clients (default: model name)")
    demo: bool = Field(False, description="serve the bundled all-MiniLM-L6-v2 offline (no download)")
    max_batch_tokens: int = Field(16384, ge=16, le=10_000_000,
        description="token budget of one batch (padded length x texts)")
    enforce_eager: bool = Field(False,
                                description="vLLM: skip torch.compile and CUDA graphs (loads faster, runs slower)")
    torch_compile: bool = Field(
        False, description="torch engine: torch.compile the model; on CUDA its forwards replay as CUDA graphs "
        "(about a minute more at start, small batches several times faster on a GPU)"
    )
    vllm_engine_core: Literal["auto", "in-process", "separate"] = Field(
        "auto", description="vLLM: engine core in this process (fastest on CPU) or its own (GPU); auto: by device"
    )
    prefix_caching: bool = Field(
        True, description="vLLM: reuse the computed prefix of a prompt seen before (a shared instruction), where "
        "vLLM supports it for the model (causal, last-token pooling); false computes every prompt whole"
    )
    batch_invariant: bool = Field(
        False, description="compute each input alone, so that its vector's bytes never depend on what it was "
        "batched with (bit-exact resume over --url, docs/bulk.md); several times slower")
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: int8 weights and activations on the openvino engine (faster, not exact; "
        "see docs/openvino.md); none keeps exact vectors"
    )
    openvino_cache_dir: str | None = Field(
        None, description="openvino: folder of exported models (default ~/.cache/embedding-service/openvino)"
    )
    int8_ranges: str = Field(
        "unit", description="the int8/uint8 vector types' per-dimension ranges: unit ([-1, 1]), calibrate (the "
        "model's own, from a stated calibration set embedded once and kept in ~/.cache/embedding-service/"
        "int8-ranges), or the path of a .npy/.json (2, dimension) array (docs/clients.md)")

    # --- the reranker (served beside the embedding model, or alone; docs/rerank.md) ----------------------
    rerank_model: str | None = Field(
        None, description="Hugging Face id of a reranker to serve too (e.g. Qwen/Qwen3-Reranker-0.6B)"
    )
    rerank_model_path: str | None = Field(None, description="local reranker directory; wins over rerank_model")
    served_rerank_model_name: str | None = Field(
        None, description="name reported to clients for the reranker (default: its id or folder name)"
    )
    rerank_only: bool = Field(False, description="serve the reranker alone (no embedding model is loaded)")
    max_rerank_documents: int = Field(1000, ge=1, le=100_000, description="most documents in one rerank request")
    models_file: str | None = Field(
        None, description="YAML file listing every model to serve, each with its name, task and own settings "
        "(docs/models.md); replaces the model flags")

    # --- request limits --------------------------------------------------------------------------------
    max_inputs_per_request: int = Field(2048, ge=1, le=100_000, description="most inputs in one request")
    max_request_tokens: int = Field(
        300_000, ge=1, le=100_000_000, description="most tokens in one request, all inputs together"
    )
    max_token_vectors_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, le=1 << 31, description="largest answer of a multi-vector (ColBERT) model's "
        "token vectors, counted as float32 bytes (tokens x dimension x 4); a request over it gets 413"
    )
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, le=1 << 31, description="largest request body in bytes (413 above)"
    )
    truncate: bool = Field(False, description="the same as long_inputs truncate (its older name)")
    long_inputs: Literal["refuse", "truncate", "chunk"] = Field("refuse", description="over-long inputs: refuse "
        "(400 naming the limit), truncate (keep the start), or chunk (embed windows, average them; docs/clients.md)")
    max_chunked_input_tokens: int = Field(262_144, ge=1, le=100_000_000, description="most tokens of one input "
                                          "when chunking (400 above; about 1 MB of English text)")
    input_type_strict: bool = Field(
        False, description="answer 400 for an input_type (search_query, classification, clustering) the model "
        "has no prompt for, instead of embedding the text as it is"
    )
    matryoshka_models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["Qwen/Qwen3-Embedding-0.6B", "Qwen/Qwen3-Embedding-4B", "Qwen/Qwen3-Embedding-8B"],
        description="models that accept `dimensions` (comma-separated); Qwen3 configs are detected too",
    )
    token_ids_tiktoken: str | None = Field(
        None, description="read token-id inputs as ids of this tiktoken encoding (cl100k_base: what LangChain "
        "sends by default) and embed their text; default: ids of the served model's own tokenizer",
    )

    # --- the exact result cache (docs/cache.md) ----------------------------------------------------------
    result_cache_bytes: int = Field(256 * 1024**2, ge=0, le=1 << 40, description="memory for the exact result "
                                    "cache (vectors of token ids seen before, LRU, per process); 0 = none")
    result_cache_redis: str | None = Field(None, pattern=r"^(redis|rediss|unix)://", description="Redis URL "
                                           "(redis://host:6379/0) of a result cache shared by instances and kept "
                                           "across restarts (the redis extra); unset = memory only")
    result_cache_redis_ttl_s: float = Field(7 * 86400.0, gt=0.0, le=10 * 365 * 86400.0,
                                            description="seconds a Redis cache entry lives after it was written")
    result_cache_per_key: bool = Field(False, description="keep each API key's result cache entries apart (no "
                                       "client can tell what another embedded); false = shared by all clients")

    # --- robustness ----------------------------------------------------------------------------------
    max_queue_requests: int = Field(1024, ge=1, le=1_000_000, description="queued requests before 503")
    max_queue_tokens: int = Field(1_000_000, ge=1, le=1_000_000_000, description="queued tokens before 503")
    request_timeout_s: float = Field(120.0, gt=0.0, le=86_400.0, description="per-request time limit")
    shutdown_timeout: float = Field(30.0, ge=0.0, le=3600.0, description="seconds to drain on SIGTERM")

    # --- connections (transport.py; defaults for an internet-facing server behind a proxy) ----------------
    keep_alive_timeout_s: float = Field(
        75.0, gt=0.0, le=3600.0,
        description="close a keep-alive connection idle this long (above a proxy's upstream idle timeout)",
    )
    header_timeout_s: float = Field(
        10.0, gt=0.0, le=3600.0, description="time a client has to send a request's headers (408 after)"
    )
    body_timeout_s: float = Field(
        60.0, gt=0.0, le=3600.0, description="time a client has to send a request's body once its headers are in"
    )
    max_header_bytes: int = Field(
        32768, ge=1024, le=1 << 24, description="largest request line plus headers in bytes (431 above)"
    )
    max_connections: int = Field(
        4096, ge=16, le=1_000_000,
        description="open connections per process (also kept below the open-file limit); the oldest idle "
                    "or still-sending connection is closed to make room",
    )
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="proxy addresses whose X-Forwarded-For/-Proto are trusted (comma-separated, '*' = any); "
                    "none = the headers are ignored",
    )

    # --- operations ------------------------------------------------------------------------------------
    log_format: Literal["text", "json"] = Field(
        "text", description="log line format: text, or json (one object per line, for log shippers)"
    )
    api_docs: bool = Field(
        True, description="serve the API reference (/docs, /redoc, /openapi.json; open without an API key)"
    )
    otlp_endpoint: str | None = Field(
        None, pattern=r"^https?://[^\s/]+",
        description="OpenTelemetry collector's OTLP/HTTP URL (http://host:4318): trace each request there (needs "
        "the tracing extra); unset = no tracing, no cost")
    otlp_service_name: str = Field("embedding-service", min_length=1, description="service.name of the traces")
    trace_sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0, description="share of new traces kept (a caller's traceparent decides its own)")

    # --- security and rate limits (api/middleware/security.py) ------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, repr=False,
        description="keys clients send as 'Authorization: Bearer KEY' (JSON list or comma-separated); "
                    "none and no api_key_file = no authentication",
    )
    api_key_file: str | None = Field(
        None, description="file of API keys, one a line, or 'sha256:HEX' digests of them ('#' comments)"
    )
    auth_exempt_paths: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["/health", "/health/live", "/health/ready", "/metrics"],
        description="paths open without an API key"
    )
    auth_failures_per_minute: int = Field(
        30, ge=0, le=1_000_000,
        description="failed API-key attempts per minute per address before it gets 429 (key or not); 0 = off",
    )
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origins whose browser pages may call the API (JSON list or comma-separated, e.g. "
                    "https://app.example.com; * = any); none = no CORS headers (browsers block other origins)",
    )
    rate_limit_rpm: int = Field(
        0, ge=0, le=100_000_000, description="requests per minute per API key (per address without keys); 0 = off"
    )
    rate_limit_tpm: int = Field(
        0, ge=0, le=10_000_000_000,
        description="input tokens per minute per API key (or address); 0 = unlimited"
    )

    # --- the Files and Batch APIs (docs/batch.md): on only with a data directory ----------------------
    data_dir: str | None = Field(
        None, description="folder for the Files and Batch APIs' database and files (SQLite + files); "
        "unset = those APIs answer 404 and nothing is written to disk",
    )
    batch_max_file_bytes: int = Field(
        200 * 1024 * 1024, ge=1024, le=1 << 40, description="largest file a client may upload (413 above)"
    )
    batch_max_lines: int = Field(50_000, ge=1, le=10_000_000, description="most requests in one batch input file")
    batch_max_stored_bytes: int = Field(
        20 * 1024**3, ge=1024, le=1 << 50,
        description="all stored files together (uploads and batch outputs), bytes; an upload above is refused "
                    "(413) and a batch whose output would pass it fails",
    )
    batch_retention_days: float = Field(
        30.0, gt=0.0, le=36_500.0, description="files are deleted this many days after they were made"
    )
    batch_concurrency: int = Field(
        64, ge=1, le=1024, description="batch requests in flight at once (they wait in the engine's background "
        "lane, which runs only while online requests leave it idle: enough to fill a batch)",
    )

    # --- fault injection for the fake engine (tests and demos only) -------------------------------------
    fake_delay_ms: float = Field(0.0, ge=0.0, le=600_000.0, description="engine fake: milliseconds slept per batch")
    fake_load_delay_ms: float = Field(
        0.0, ge=0.0, le=600_000.0, description="engine fake: milliseconds the model load takes"
    )
    fake_fail_batches: Annotated[list[int], NoDecode] = Field(
        default_factory=list, description="engine fake: batch numbers (0-based) that raise an error"
    )
    fake_die_after: int | None = Field(
        None, ge=0, description="engine fake: after this many batches the backend dies (BackendDeadError)"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("matryoshka_models", "auth_exempt_paths", "fake_fail_batches",
                     "forwarded_allow_ips", "cors_allow_origins", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        return split_json_or_csv(value)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_configured_means_keys(cls, value: object) -> object:
        # Fail closed: a value that is not blank but holds no key (" , ", "[]" with spaces...) was meant to
        # turn authentication on; serving everyone without a key would be the wrong way round.
        items = split_json_or_csv(value)
        text = value.strip() if isinstance(value, str) else None
        if isinstance(items, list) and not any(str(item).strip() for item in items) and text not in (None, "", "[]"):
            raise ValueError("holds no API key; give keys, or leave it empty to serve without authentication")
        return items

    @field_validator("api_keys")
    @classmethod
    def _keys_usable(cls, value: list[str]) -> list[str]:
        if any(key.strip() and not usable_api_key(key.strip()) for key in value):
            raise ValueError(UNUSABLE_KEY)
        return value

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        origins = [origin.strip().rstrip("/") for origin in value if origin.strip()]
        for origin in origins:  # an origin is scheme://host[:port], no path: a typo here fails the start
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], or *)")
        return origins

    @field_validator("int8_ranges")
    @classmethod
    def _int8_ranges(cls, value: str) -> str:
        if value in ("unit", "calibrate"):
            return value
        if not value.endswith((".npy", ".json")) or not os.access(os.path.expanduser(value), os.R_OK):
            raise ValueError(f"int8_ranges must be unit, calibrate or a readable .npy/.json file, got {value!r}")
        return value

    @field_validator("api_key_file")
    @classmethod
    def _key_file_readable(cls, value: str | None) -> str | None:
        if value is not None and not os.access(value, os.R_OK):
            raise ValueError(f"API key file {value!r} does not exist or is not readable")
        return value

    @model_validator(mode="after")
    def _settings_agree(self) -> EmbeddingConfig:
        # Refused, not ignored: a user asking for int8 on an engine that cannot do it would get fp32 silently.
        if self.quantize != "none" and self.engine in ("torch", "vllm"):
            raise ValueError(f"quantize {self.quantize} runs on the openvino engine, not {self.engine} "
                             "(use --engine openvino, or auto)")
        if self.truncate and self.long_inputs == "chunk":  # (truncate is long_inputs truncate's older name)
            raise ValueError("truncate and long_inputs chunk contradict each other: set one of them")
        # Refused, not merged: which model a request gets must not depend on how two sources were combined.
        if self.models_file is not None:
            clash = [name for name in MODEL_FLAGS if name in self.model_fields_set
                     and getattr(self, name) != type(self).model_fields[name].get_default()]
            if clash:
                raise ValueError(f"models_file lists every model: drop {', '.join(clash)} (name the models "
                                 "in the file)")
        # One process owns the SQLite writer and runs the batches: workers would each run every batch.
        if self.data_dir and self.workers > 1:
            raise ValueError("data_dir (the Batch API) needs workers=1: one process runs the batches; "
                             "scale out with more servers instead")
        return self

    @property
    def model_source(self) -> str:
        """What the engine loads: the local directory when given, else the hub id."""
        return self.model_path or self.model_name

    @property
    def matryoshka_listed(self) -> bool:
        """Whether `matryoshka_models` names the served model (hub id, served name, or a local dir's name).

        A `--model-path` directory counts by its folder name only, so that the default model_name does not
        switch Matryoshka on for some other local model. (The torch backend also detects Qwen3 configs.)
        """
        names = {self.served_model_name} if self.served_model_name else set()
        if self.demo:
            names.add(DEMO_MODEL_NAME)
        elif self.model_path:
            names.add(self._model_path_name)
        else:
            names.add(self.model_name)
        listed = set(self.matryoshka_models) | {name.rsplit("/", 1)[-1] for name in self.matryoshka_models}
        return bool(names & listed)

    @property
    def public_model_name(self) -> str:
        """The name clients see in responses and /v1/models."""
        if self.served_model_name:
            return self.served_model_name
        if self.demo:
            return DEMO_MODEL_NAME
        if self.model_path and self.model_name == DEFAULT_MODEL:
            # A local directory with no name given: its folder name, not the default hub id it may not be.
            return self._model_path_name or self.model_name
        return self.model_name

    @property
    def serves_reranker(self) -> bool:
        return bool(self.rerank_model or self.rerank_model_path)

    @property
    def serves_embeddings(self) -> bool:
        return not (self.rerank_only and self.serves_reranker)

    @property
    def public_rerank_model_name(self) -> str | None:
        """The reranker's name for clients: served_rerank_model_name, its hub id, or its folder name."""
        if not self.serves_reranker:
            return None
        if self.served_rerank_model_name:
            return self.served_rerank_model_name
        if self.rerank_model_path:
            return self.rerank_model_path.rstrip("/").rsplit("/", 1)[-1] or self.rerank_model_path
        return self.rerank_model

    @property
    def _model_path_name(self) -> str:
        """The folder name of `model_path` ("" when unset)."""
        return (self.model_path or "").rstrip("/").rsplit("/", 1)[-1]

