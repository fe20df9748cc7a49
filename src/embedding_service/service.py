"""The composition root: settings become a plan (what each model is, where it lives, which engine runs it)
exactly once, and the plan becomes engines. The CLI serves them over HTTP; other commands (bulk embedding)
can build the same engines without HTTP.

    settings --plan_service--> ServicePlan(models: ModelPlan by name) --build_engine--> EngineCore (per task)

A plan holds one ModelPlan per served model, each with its task ("embed" or "rerank"), its own settings,
engine and batcher: from the model flags (an embedding model and/or a reranker) or from a models file
(models_file.py: any number of each). Nothing here imports torch or vllm: a plan is decided from
files and installed packages, so it can set process-wide knobs (OpenMP) before either is imported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from .backends import (
    BackendLoadError,
    BackendOptions,
    FakeOptions,
    create_backend,
    create_multivector_backend,
    create_scoring_backend,
    create_sparse_backend,
    numerics_versions,
)
from .backends.model.facts import ModelFacts, read_model_facts
from .backends.model.resolve import resolve_model_dir
from .backends.runtime.choice import vllm_fit
from .config import EmbeddingConfig
from .engine.cache_fingerprint import model_fingerprint
from .engine.core import EngineCore
from .engine.engine import EmbeddingEngine, EngineOptions
from .engine.loading import ModelLoad
from .engine.multivector import MultiVectorEngine
from .engine.options import ResultCacheOptions
from .engine.rerank import RerankEngine
from .engine.result_cache import ModelCache, ResultCache
from .engine.sparse import SparseEngine
from .engine.types import EMBED, MULTIVECTOR, RERANK, SPARSE
from .memory_fit import plan_shortfall
from .models_file import read_models_file

__all__ = [
    "EMBED",
    "MULTIVECTOR",
    "RERANK",
    "SPARSE",
    "EngineKind",
    "ModelPlan",
    "ServicePlan",
    "build_embedding_engine",
    "build_engine",
    "build_engines",
    "choose_engine",
    "model_cache",
    "model_loads",
    "onednn_cache_for",
    "open_result_cache",
    "openmp_waits_for",
    "plan_model",
    "plan_service",
]

log = logging.getLogger("embedding_service")

EngineKind = Literal["torch", "vllm", "openvino", "fake"]


@dataclass(frozen=True)
class ModelPlan:
    """One model to serve, fully decided: nothing downstream resolves a folder or picks an engine again."""

    role: str  # its task: EMBED, RERANK, SPARSE or MULTIVECTOR
    model_dir: str  # the local folder ("" for the fake engine, which loads nothing)
    facts: ModelFacts  # what the folder says about the model (also in backend.facts)
    engine: EngineKind  # `auto` already resolved
    backend: BackendOptions
    engine_options: EngineOptions
    fake: FakeOptions | None  # the fake engine's fault injection
    max_documents: int | None = None  # the reranker: most documents in one request
    aliases: tuple[str, ...] = ()  # more names clients may send as `model`

    @property
    def name(self) -> str:
        """The served name (`model` in requests and responses)."""
        return self.backend.model_label

    @property
    def loads_alone(self) -> bool:
        """Whether it must load while no other model does (engine/loading.py). vLLM: in this process its
        engine core keeps process-wide state (backends/vllm/cores.py), and on a GPU it sizes its KV cache from
        the memory that its profiling run sees used, which another model's load would add to. torch with torch_compile:
        dynamo's compilation is not thread-safe. The others (torch eager, openvino, fake) load in their own
        threads, together (their transformers builds taking turns: backends/base.TRANSFORMERS_BUILD)."""
        return self.engine == "vllm" or (self.engine == "torch" and self.backend.torch_compile)


@dataclass(frozen=True)
class ServicePlan:
    """Every model the service runs, by served name, in the order given (the first of a task is its default)."""

    models: dict[str, ModelPlan]
    result_cache: ResultCacheOptions | None = None  # None or not enabled: no cache

    def of_task(self, task: str) -> list[ModelPlan]:
        return [model for model in self.models.values() if model.role == task]

    @property
    def embed(self) -> ModelPlan:
        """The first embedding model (bulk embedding needs one)."""
        models = self.of_task(EMBED)
        if not models:
            raise BackendLoadError("no embedding model is served (rerank_only is set)")
        return models[0]

    @property
    def rerank(self) -> ModelPlan | None:
        models = self.of_task(RERANK)
        return models[0] if models else None


def choose_engine(settings: EmbeddingConfig, facts: ModelFacts) -> EngineKind:
    """The engine to run: as configured, or for `auto` vLLM where installed and a fit, else torch (logged).

    Quantised arithmetic is never chosen for the user: only `quantize` set makes `auto` pick openvino.
    """
    if settings.engine != "auto":
        return settings.engine
    if settings.quantize != "none":
        log.info("engine auto: quantize=%s was asked for: using the openvino engine", settings.quantize)
        return "openvino"
    use_vllm, why = vllm_fit(facts, settings.device)
    log.info("engine auto: %s: using %s", why, "vLLM" if use_vllm else "the transformers/torch engine")
    return "vllm" if use_vllm else "torch"


def plan_model(settings: EmbeddingConfig, role: str | None = EMBED) -> ModelPlan:
    """Resolve the model folder of `role` (downloading only if not cached), read its facts and choose its
    engine, once. The reranker shares the engine choice, device, dtype and limits of the settings. Role None:
    the folder's own vectors (sparse, multi-vector, else embedding), for bulk jobs, which write any of them.

    Raises BackendLoadError when the model cannot be found.
    """
    fake = settings.engine == "fake"
    if role == RERANK:
        model_dir = "" if fake else resolve_model_dir(settings.rerank_model or "", settings.rerank_model_path, False)
    else:
        model_dir = "" if fake else resolve_model_dir(settings.model_name, settings.model_path, settings.demo)
    facts = read_model_facts(model_dir or None)
    if role is None:
        role = facts.task if facts.task in (SPARSE, MULTIVECTOR) else EMBED
    if role == EMBED and facts.task == SPARSE:  # else: wrong vectors, silently
        raise BackendLoadError(f"{model_dir} is a sparse (SPLADE) model (sentence-transformers SparseEncoder): "
                               "serve it as task: sparse in a models file (docs/sparse.md)")
    if role == EMBED and facts.task == MULTIVECTOR:  # a pooled vector of it would be made up
        raise BackendLoadError(f"{model_dir} is a multi-vector (ColBERT, PyLate) model: serve it as task: "
                               "multivector in a models file (docs/sparse.md)")
    # (auto: sparse and multi-vector models run on the torch engine, which serves every layout of them; vLLM
    # serves some sparse ones when asked: backends/vllm/sparse.py)
    auto_torch = role in (SPARSE, MULTIVECTOR) and settings.engine == "auto"
    kind = "torch" if auto_torch else choose_engine(settings, facts)
    backend = BackendOptions.from_config(settings, model_dir or settings.model_source, facts)
    if role == RERANK:  # (on openvino always with fp32 weights: int8 is for the embedding model)
        backend = replace(backend, model_label=settings.public_rerank_model_name or "reranker", matryoshka=False)
    return ModelPlan(
        role=role,
        model_dir=model_dir,
        facts=facts,
        engine=kind,
        backend=backend,
        engine_options=EngineOptions.from_config(settings),
        fake=FakeOptions.from_config(settings) if kind == "fake" else None,
        max_documents=settings.max_rerank_documents if role in (RERANK, MULTIVECTOR) else None,
    )


def plan_service(settings: EmbeddingConfig) -> ServicePlan:
    """Every model of the models file; without one, the embedding model unless rerank_only, and the reranker
    when one is named. Raises BackendLoadError (a model not found) or ModelsFileError."""
    if settings.models_file is not None:
        planned = [replace(plan_model(entry.settings, entry.task), aliases=entry.aliases)
                   for entry in read_models_file(settings)]
    else:
        roles = [EMBED] if settings.serves_embeddings else []
        roles += [RERANK] if settings.serves_reranker else []
        planned = [plan_model(settings, role) for role in roles]
        if len({model.name for model in planned}) < len(planned):
            raise BackendLoadError(f"the embedding model and the reranker are both named '{planned[0].name}': "
                                   "give them different names (--served-model-name, --served-rerank-model-name)")
    copies = 1 if settings.api_processes > 1 else settings.workers  # (each worker loads its own copy)
    shortfall = plan_shortfall([(model.name, model.engine, model.backend) for model in planned], copies)
    if shortfall is not None:
        raise BackendLoadError(shortfall)
    return ServicePlan(models={model.name: model for model in planned},
                       result_cache=ResultCacheOptions.from_config(settings))


def build_engine(model: ModelPlan, cache: ResultCache | None = None) -> EngineCore:
    """The (not yet started) engine of one planned model, for its task. `await engine.start()` loads it.
    Embedding, rerank and sparse models answer from `cache` where they can (multi-vector ones do not use it)."""
    if model.role == RERANK:
        assert model.max_documents is not None  # planned for the reranker's role
        return RerankEngine(create_scoring_backend(model.engine, model.backend), model.engine_options,
                            max_documents=model.max_documents, result_cache=model_cache(model, cache))
    if model.role == SPARSE:
        return SparseEngine(create_sparse_backend(model.engine, model.backend), model.engine_options,
                            model_cache(model, cache))
    if model.role == MULTIVECTOR:
        assert model.max_documents is not None  # planned for its scoring
        return MultiVectorEngine(create_multivector_backend(model.engine, model.backend), model.engine_options,
                                 max_documents=model.max_documents)
    return build_embedding_engine(model, cache)


def build_embedding_engine(model: ModelPlan, cache: ResultCache | None = None) -> EmbeddingEngine:
    """The engine of a planned embedding model (bulk embedding needs one; it builds it without a cache)."""
    if model.role != EMBED:
        raise BackendLoadError(f"model '{model.name}' is not an embedding model (task: {model.role}); it cannot "
                               "embed")
    return EmbeddingEngine(create_backend(model.engine, model.backend, model.fake), model.engine_options,
                           model_cache(model, cache), model_dir=model.model_dir)


def model_cache(model: ModelPlan, cache: ResultCache | None) -> ModelCache | None:
    """The model's view of `cache` (None: no cache), namespaced by its fingerprint: the settings that decide
    its vectors and the model (cache_fingerprint.py); what only the loaded backend knows is bound later. The
    same in every process that serves the model (an API process's cache keys as the engine process's would)."""
    if cache is None:
        return None
    backend, facts = model.backend, model.facts
    numerics = {"engine": model.engine, "dtype": backend.dtype, "device": backend.device,
                "quantize": backend.quantize, "torch_compile": backend.torch_compile,
                "enforce_eager": backend.enforce_eager, "prefix_caching": backend.prefix_caching,
                "tensor_parallel_size": backend.tensor_parallel_size, "pooling": facts.pooling,
                "normalize": facts.normalize, "task": model.role,
                "batch_invariant": model.engine_options.batch_invariant,
                "versions": numerics_versions(model.engine)}
    return cache.for_model(model_fingerprint(model.model_dir, numerics, by_content=cache.redis is not None))


def model_loads(plan: ServicePlan, engines: Mapping[str, EngineCore]) -> list[ModelLoad]:
    """What engine/loading.py needs to start the planned models' `engines` (by served name)."""
    return [ModelLoad(name, model.role, engines[name], model.loads_alone) for name, model in plan.models.items()]


def build_engines(plan: ServicePlan) -> dict[str, EngineCore]:
    """The engine of every planned model, by served name, over one result cache."""
    cache = open_result_cache(plan.result_cache)
    return {name: build_engine(model, cache) for name, model in plan.models.items()}


def open_result_cache(options: ResultCacheOptions | None) -> ResultCache | None:
    """The process's result cache, or None when off (docs/cache.md). Raises ImportError for a Redis URL
    without the redis package."""
    if options is None or not options.enabled:
        return None
    redis = None
    if options.redis_url is not None:
        from .engine.redis_store import RedisStore

        redis = RedisStore(options.redis_url, options.redis_ttl_s)
    return ResultCache(options.max_bytes, redis, per_key=options.per_key)


# libgomp's spin before an idle OpenMP worker sleeps, for the torch and vLLM engines. libgomp's default
# (300,000 spins: several ms) kept a worker spinning on a core after every batch while the event loop
# answered that batch's requests and read the next ones; sleeping at once (PASSIVE) makes every op's barrier
# wake a sleeper. Both lost to ~10,000 spins (well under a millisecond) on 2 cores, MiniLM (bench/RESULTS.md,
# session 27): vLLM over HTTP at 16 clients 0.80x -> 0.88x of our engine in-process; torch (was PASSIVE)
# 63 -> 104 texts/s at 1 client, 329 -> 424 at 16.
GOMP_SPINCOUNT = "10000"
# The engines that run on torch's CPU runtime (libgomp and oneDNN): the ones the two settings below are for.
TORCH_RUNTIME_ENGINES = ("torch", "vllm")


def openmp_waits_for(engines: Collection[str], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """How the OpenMP team of these engines (one per process, shared by both models) waits when idle,
    unless the user chose (OMP_WAIT_POLICY or GOMP_SPINCOUNT in `environ`).

    The server's event loop and tokenizer thread share the CPUs with the model's OpenMP team: workers that
    spin long after a batch take those CPUs from them. Returns the variables to add to `environ`; libgomp
    reads them once, when torch loads it, so the caller sets them before torch is imported. OpenVINO
    threads with TBB and the fake engine has no threads: nothing for them.
    """
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}  # the user's choice
    if any(engine in TORCH_RUNTIME_ENGINES for engine in engines):
        return {"GOMP_SPINCOUNT": GOMP_SPINCOUNT}
    return {}


# oneDNN (under torch and vLLM on CPU) keeps the kernels it builds for each operator shape, up to 1,024 by
# default. With dynamic batching nearly every batch has a new token count, so that cache only grew: MiniLM on
# vLLM went from 1.5 to 2.9 GB in 15 minutes of traffic and was still climbing; 64 held it at start + ~140 MB,
# with no loss in texts/s (docs/reliability.md, "Memory under long traffic").
ONEDNN_PRIMITIVE_CACHE = "64"


def onednn_cache_for(engines: Collection[str], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The bound on oneDNN's kernel cache for these engines, unless the user set one (either name); oneDNN
    reads it at its first kernel, so the caller sets it before the model runs."""
    if "ONEDNN_PRIMITIVE_CACHE_CAPACITY" in environ or "DNNL_PRIMITIVE_CACHE_CAPACITY" in environ:
        return {}
    if any(engine in TORCH_RUNTIME_ENGINES for engine in engines):
        return {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": ONEDNN_PRIMITIVE_CACHE}
    return {}
