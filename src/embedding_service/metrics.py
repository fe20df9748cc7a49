"""Prometheus metrics of one server process, on its own registry.

Each app gets its own CollectorRegistry (not prometheus-client's global one), so that several apps in one
process (tests) never clash on names. Counters and histograms are updated as requests and batches finish;
the queue, model and engine-state values are read live from the engine at scrape time.

With `workers > 1` every worker process has its own registry: a scrape through the shared port reaches one
worker at random. Run one worker per instance (the spec's recommendation) and scale out with instances, each
scraped on its own port (see docs/ops.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .engine.types import EngineState

if TYPE_CHECKING:
    from .engine.core import EngineCore

__all__ = ["CONTENT_TYPE", "ServiceMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Request latency: from a few ms (a cached short text on a GPU) to the request timeout range.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
COMPUTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


class _EngineCollector(Collector):
    """Values read from the engine at scrape time: queue depth, limits, model load time, state, model info.
    `prefix` names the engine's metrics: "embedding" for the embedding model, "embedding_rerank" for the
    reranker."""

    def __init__(self, engine: EngineCore, prefix: str = "embedding") -> None:
        self.engine = engine
        self.prefix = prefix

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine, p = self.engine, self.prefix
        yield GaugeMetricFamily(f"{p}_queue_requests", "Requests queued or running in the batcher",
                                value=engine.queued_requests)
        yield GaugeMetricFamily(f"{p}_queue_tokens", "Tokens of the requests queued or running",
                                value=engine.queued_tokens)
        yield GaugeMetricFamily(f"{p}_queue_max_requests",
                                "Queued requests at which new ones are refused with 503",
                                value=engine.options.max_queue_requests)
        yield GaugeMetricFamily(f"{p}_queue_max_tokens",
                                "Queued tokens at which new requests are refused with 503",
                                value=engine.options.max_queue_tokens)
        if engine.load_seconds is not None:
            yield GaugeMetricFamily(f"{p}_model_load_seconds", "Seconds the model took to load",
                                    value=engine.load_seconds)
        state = GaugeMetricFamily(f"{p}_engine_state", "1 for the engine's current state, else 0",
                                  labels=["state"])
        for candidate in EngineState:
            state.add_metric([candidate.value], 1.0 if engine.state is candidate else 0.0)
        yield state
        info = engine.info
        if info is not None:
            labels = ["model", "engine", "device", "dtype", "dimension", "max_model_len"]
            model = GaugeMetricFamily(f"{p}_model_info", "The model served (always 1)", labels=labels)
            model.add_metric([info.model, info.engine, info.device, info.dtype, str(info.dimension),
                              str(info.max_model_len)], 1.0)
            yield model


class ServiceMetrics:
    """All metrics of one app. `observe_request` is the request middleware's observer; the engine's
    `on_batch` hook is chained (an existing hook keeps being called)."""

    def __init__(self, engine: EngineCore | None) -> None:
        """`engine`: the embedding model's (None when a reranker is served alone: add_reranker)."""
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        if engine is not None:
            self.registry.register(_EngineCollector(engine))
        reg = self.registry
        self.requests = Counter("embedding_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=reg)
        self.request_seconds = Histogram("embedding_request_duration_seconds",
                                         "Time from request arrival to the end of the response",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=reg)
        self.batch_size = Histogram("embedding_batch_size", "Sequences per batch run by the engine",
                                    buckets=BATCH_SIZE_BUCKETS, registry=reg)
        self.batch_tokens = Histogram("embedding_batch_tokens", "Tokens per batch run by the engine",
                                      buckets=BATCH_TOKEN_BUCKETS, registry=reg)
        self.batch_seconds = Histogram("embedding_batch_compute_seconds", "Engine compute time per batch",
                                       buckets=COMPUTE_BUCKETS, registry=reg)
        self.texts = Counter("embedding_texts", "Texts (sequences) embedded", registry=reg)
        self.tokens = Counter("embedding_tokens", "Tokens embedded", registry=reg)
        # Bounded: routes are templates (or "unmatched"), methods and statuses are few.
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        if engine is not None:
            self._chain_batch_hook(engine)

    def _chain_batch_hook(self, engine: EngineCore,
                          observe: Callable[[int, int, float], None] | None = None) -> None:
        previous = engine.on_batch
        observe = observe or self.observe_batch

        def on_batch(size: int, tokens: int, seconds: float) -> None:
            observe(size, tokens, seconds)
            if previous is not None:
                previous(size, tokens, seconds)

        engine.on_batch = on_batch

    def add_reranker(self, engine: EngineCore) -> None:
        """The reranker's engine values and batches, as embedding_rerank_* (pairs instead of texts)."""
        reg = self.registry
        reg.register(_EngineCollector(engine, "embedding_rerank"))
        size = Histogram("embedding_rerank_batch_size", "Pairs per batch run by the reranker",
                         buckets=BATCH_SIZE_BUCKETS, registry=reg)
        tokens = Histogram("embedding_rerank_batch_tokens", "Tokens per batch run by the reranker",
                           buckets=BATCH_TOKEN_BUCKETS, registry=reg)
        seconds = Histogram("embedding_rerank_batch_compute_seconds", "Reranker compute time per batch",
                            buckets=COMPUTE_BUCKETS, registry=reg)
        pairs = Counter("embedding_rerank_pairs", "(query, document) pairs scored", registry=reg)
        pair_tokens = Counter("embedding_rerank_tokens", "Tokens of the pairs scored", registry=reg)

        def observe(n: int, n_tokens: int, took: float) -> None:
            size.observe(n)
            tokens.observe(n_tokens)
            seconds.observe(took)
            pairs.inc(n)
            pair_tokens.inc(n_tokens)

        self._chain_batch_hook(engine, observe)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:  # label lookups cost more than the update itself: do each once
            children = (self.requests.labels(route, method, str(status)), self.request_seconds.labels(route))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, size: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)
        self.texts.inc(size)
        self.tokens.inc(tokens)

    def render(self) -> bytes:
        """The registry in Prometheus text format (CONTENT_TYPE)."""
        return generate_latest(self.registry)
