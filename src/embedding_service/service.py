"""The composition root: settings become a plan (what each model is, where it lives, which engine runs it)
exactly once, and the plan becomes engines. The CLI serves them over HTTP; other commands (bulk embedding)
can build the same engines without HTTP.

    settings --plan_service--> ServicePlan(models: ModelPlan per role) --build_engine--> EmbeddingEngine

A plan holds one ModelPlan per role ("embed" today); a second model (a reranker) is another role in the
same plan, with its own engine and batcher. Nothing here imports torch or vllm: a plan is decided from
files and installed packages, so it can set process-wide knobs (OpenMP) before either is imported.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

from .backends import BackendOptions, FakeOptions, create_backend
from .backends.choice import vllm_fit
from .backends.model_facts import ModelFacts, read_model_facts
from .backends.resolve import resolve_model_dir
from .config import EmbeddingConfig
from .engine.engine import EmbeddingEngine, EngineOptions

__all__ = [
    "EMBED",
    "EngineKind",
    "ModelPlan",
    "ServicePlan",
    "build_engine",
    "build_engines",
    "choose_engine",
    "passive_openmp_for",
    "plan_model",
    "plan_service",
]

log = logging.getLogger("embedding_service")

EngineKind = Literal["torch", "vllm", "openvino", "fake"]
EMBED = "embed"  # the role of the embedding model


@dataclass(frozen=True)
class ModelPlan:
    """One model to serve, fully decided: nothing downstream resolves a folder or picks an engine again."""

    role: str
    model_dir: str  # the local folder ("" for the fake engine, which loads nothing)
    facts: ModelFacts  # what the folder says about the model (also in backend.facts)
    engine: EngineKind  # `auto` already resolved
    backend: BackendOptions
    engine_options: EngineOptions
    fake: FakeOptions | None  # the fake engine's fault injection


@dataclass(frozen=True)
class ServicePlan:
    """Every model the service runs, by role."""

    models: dict[str, ModelPlan]

    @property
    def embed(self) -> ModelPlan:
        return self.models[EMBED]


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


def plan_model(settings: EmbeddingConfig, role: str = EMBED) -> ModelPlan:
    """Resolve the model folder (downloading only if not cached), read its facts and choose its engine, once.

    Raises BackendLoadError when the model cannot be found.
    """
    model_dir = "" if settings.engine == "fake" else resolve_model_dir(
        settings.model_name, settings.model_path, settings.demo)
    facts = read_model_facts(model_dir or None)
    kind = choose_engine(settings, facts)
    return ModelPlan(
        role=role,
        model_dir=model_dir,
        facts=facts,
        engine=kind,
        backend=BackendOptions.from_config(settings, model_dir or settings.model_source, facts),
        engine_options=EngineOptions.from_config(settings),
        fake=FakeOptions.from_config(settings) if kind == "fake" else None,
    )


def plan_service(settings: EmbeddingConfig) -> ServicePlan:
    return ServicePlan(models={EMBED: plan_model(settings, EMBED)})


def build_engine(model: ModelPlan) -> EmbeddingEngine:
    """The (not yet started) engine of one planned model. `await engine.start()` loads it."""
    return EmbeddingEngine(create_backend(model.engine, model.backend, model.fake), model.engine_options)


def build_engines(plan: ServicePlan) -> dict[str, EmbeddingEngine]:
    return {role: build_engine(model) for role, model in plan.models.items()}


def passive_openmp_for(engine: EngineKind) -> None:
    """Let torch's idle OpenMP threads sleep instead of spinning (unless the user chose otherwise).

    The server's event loop and tokenizer thread share the CPUs with torch's OpenMP team; spinning workers
    take those CPUs from them, and on a shared or small machine every op's barrier then waits for a
    descheduled thread. Measured on 2 busy cores (bench/RESULTS.md): MiniLM 3-5x the texts/s at 1 and 16
    clients. Read once when OpenMP loads, so call it before torch is imported. vLLM manages its own.
    """
    if engine == "torch" and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
