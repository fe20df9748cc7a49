"""Prometheus metrics of one server process, on its own registry.

Each app gets its own CollectorRegistry (not prometheus-client's global one), so that several apps in one
process (tests) never clash on names. Counters and histograms are updated as requests and batches finish;
the queue, model and engine-state values are read live from the engine at scrape time.

With `workers > 1` every worker process has its own registry: a scrape through the shared port reaches one
worker at random. Run one worker per instance (the spec's recommendation) and scale out with instances, each
scraped on its own port (see docs/ops.md). With `api_processes > 1` there is one view: counters and histograms
(requests in the API processes, batches in the engine process) go to prometheus-client's multiprocess files
and any API process renders them all; the queue gauges are the engine process's (`QueueGauges`), the result
cache's counts the API processes' (`_CacheFiles`: each has its own cache).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client import values as prometheus_values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .engine.types import EngineState

if TYPE_CHECKING:
    from .engine.core import EngineCore
    from .engine.result_cache import ModelCache

__all__ = ["CONTENT_TYPE", "QueueGauges", "ServiceMetrics", "use_multiprocess_files"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Request latency: from a few ms (a cached short text on a GPU) to the request timeout range.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
COMPUTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


_PREFIX = {"rerank": "embedding_rerank", "sparse": "embedding_sparse"}  # a task's metric names (else embedding_*)


class _EngineCollector(Collector):
    """Values read from each engine at scrape time, one series per model (label `model`): queue depth,
    limits, model load time, state, model info. `prefix` names the task's metrics: "embedding" for embedding
    models, "embedding_rerank" for rerankers."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.engines: list[tuple[str, EngineCore]] = []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        p = self.prefix
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "queue_requests": GaugeMetricFamily(f"{p}_queue_requests", "Requests queued or running in the batcher",
                                                labels=["model"]),
            "queue_tokens": GaugeMetricFamily(f"{p}_queue_tokens", "Tokens of the requests queued or running",
                                              labels=["model"]),
            "background": GaugeMetricFamily(f"{p}_queue_background_requests", "Batch API lines queued or running "
                                            "in the batcher's background lane (not in queue_requests)",
                                            labels=["model"]),
            "busy": CounterMetricFamily(f"{p}_engine_busy_seconds", "Seconds the engine spent on batches, by "
                                        "lane: online requests, or Batch API lines (batch)", labels=["model", "lane"]),
            "max_requests": GaugeMetricFamily(f"{p}_queue_max_requests",
                                              "Queued requests at which new ones are refused with 503",
                                              labels=["model"]),
            "max_tokens": GaugeMetricFamily(f"{p}_queue_max_tokens",
                                            "Queued tokens at which new requests are refused with 503",
                                            labels=["model"]),
            "load": GaugeMetricFamily(f"{p}_model_load_seconds", "Seconds the model took to load", labels=["model"]),
            "state": GaugeMetricFamily(f"{p}_engine_state", "1 for the engine's current state, else 0",
                                       labels=["model", "state"]),
            "info": GaugeMetricFamily(f"{p}_model_info", "The model served (always 1)",
                                      labels=["model", "engine", "device", "dtype", "dimension", "max_model_len"]),
        }
        for name, engine in self.engines:
            if engine.queue_here:  # (else the engine process's QueueGauges report the queue)
                families["queue_requests"].add_metric([name], engine.queued_requests)
                families["queue_tokens"].add_metric([name], engine.queued_tokens)
                families["background"].add_metric([name], engine.background_requests)
                for lane, seconds in engine.busy_seconds.items():
                    families["busy"].add_metric([name, lane], seconds)
            families["max_requests"].add_metric([name], engine.options.max_queue_requests)
            families["max_tokens"].add_metric([name], engine.options.max_queue_tokens)
            if engine.load_seconds is not None:
                families["load"].add_metric([name], engine.load_seconds)
            for candidate in EngineState:
                families["state"].add_metric([name, candidate.value], 1.0 if engine.state is candidate else 0.0)
            info = engine.info
            if info is not None:
                families["info"].add_metric([name, info.engine, info.device, info.dtype, str(info.dimension),
                                             str(info.max_model_len)], 1.0)
        yield from (family for family in families.values() if family.samples)


_CACHE = "embedding_result_cache"
_CACHE_COUNTERS = (("hits", "Inputs answered from the result cache (memory or Redis), without a forward"),
                   ("redis_hits", "Inputs answered from the result cache's Redis store"),
                   ("misses", "Inputs the result cache did not hold (computed, then stored)"),
                   ("evictions", "Entries dropped from the memory cache to stay within result_cache_bytes"))
_CACHE_GAUGES = (("bytes", "Bytes the memory cache holds (keys, vectors and per-entry overhead)"),
                 ("entries", "Vectors the memory cache holds"))
_REDIS_ERRORS = ("Failed calls to the result cache's Redis store (each one computes instead and pauses the store "
                 "for a few seconds)")


def _redis_errors(caches: Sequence[tuple[str, ModelCache]]) -> int | None:
    """The failures of the Redis stores of `caches` (one per process), or None when none has one."""
    stores = {id(cache.cache.redis): cache.cache.redis for _, cache in caches if cache.cache.redis is not None}
    return sum(getattr(store, "errors", 0) for store in stores.values()) if stores else None


class _CacheCollector(Collector):
    """The result cache's counters (docs/cache.md), read at scrape time: per model, inputs answered from it
    (and of those from Redis), inputs computed, entries evicted, bytes and entries held in memory; and the
    Redis store's failures (one store per process)."""

    def __init__(self) -> None:
        self.caches: list[tuple[str, ModelCache]] = []

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        model = ["model"]
        counters = {name: CounterMetricFamily(f"{_CACHE}_{name}", text, labels=model) for name, text in _CACHE_COUNTERS}
        gauges = {name: GaugeMetricFamily(f"{_CACHE}_{name}", text, labels=model) for name, text in _CACHE_GAUGES}
        for name, cache in self.caches:
            stats = cache.stats
            for key, family in counters.items():
                family.add_metric([name], getattr(stats, key))
            for key, gauge in gauges.items():
                gauge.add_metric([name], getattr(stats, key))
        yield from counters.values()
        yield from gauges.values()
        failed = _redis_errors(self.caches)
        if failed is not None:
            errors = CounterMetricFamily(f"{_CACHE}_redis_errors", _REDIS_ERRORS)
            errors.add_metric([], failed)
            yield errors


class _CacheFiles:
    """`api_processes > 1`: each API process's result cache counts, written to the multiprocess files that
    /metrics renders (counters summed over the API processes, gauges over the live ones). Brought up to date
    after each request this process answers (`observe_request`), so a scrape by any of them sees every one."""

    def __init__(self, caches: list[tuple[str, ModelCache]]) -> None:
        self.caches = caches
        self.counters = {name: Counter(f"{_CACHE}_{name}", text, ["model"], registry=None)
                         for name, text in _CACHE_COUNTERS}
        self.gauges = {name: Gauge(f"{_CACHE}_{name}", text, ["model"], multiprocess_mode="livesum", registry=None)
                       for name, text in _CACHE_GAUGES}
        self.errors = Counter(f"{_CACHE}_redis_errors", _REDIS_ERRORS, registry=None)
        self.written: dict[tuple[str, str], int] = {}  # what the files hold of each count, by (model, name)
        self.errors_written = 0

    def sync(self) -> None:
        for name, cache in self.caches:
            stats = cache.stats
            for key, counter in self.counters.items():
                now, before = getattr(stats, key), self.written.get((name, key), 0)
                if now != before:
                    counter.labels(name).inc(now - before)
                    self.written[(name, key)] = now
            for key, gauge in self.gauges.items():
                now = getattr(stats, key)
                if self.written.get((name, key)) != now:
                    gauge.labels(name).set(now)
                    self.written[(name, key)] = now
        failed = _redis_errors(self.caches) or 0
        if failed != self.errors_written:
            self.errors.inc(failed - self.errors_written)
            self.errors_written = failed


class ServiceMetrics:
    """All metrics of one app. `observe_request` is the request middleware's observer; each model's engine
    `on_batch` hook is chained (an existing hook keeps being called)."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry()
        # api_processes > 1: what /metrics renders is every process's files plus this process's live values.
        self._shared: CollectorRegistry | None = None
        if multiprocess_dir is not None:
            self._shared = CollectorRegistry()
            MultiProcessCollector(self._shared, multiprocess_dir)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        reg = self.registry
        self.requests = Counter("embedding_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=reg)
        self.request_seconds = Histogram("embedding_request_duration_seconds",
                                         "Time from request arrival to the end of the response",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=reg)
        # The error kinds of errors.py (a fixed set), by route: which errors, not only which statuses.
        self.errors = Counter("embedding_errors", "Requests answered with an error, by route and error kind",
                              ["route", "kind"], registry=reg)
        # Bounded: routes are templates (or "unmatched"), methods, statuses and error kinds are few.
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._error_children: dict[tuple[str, str], Counter] = {}
        self._tasks: dict[str, tuple[_EngineCollector, tuple[Histogram, Histogram, Histogram, Counter, Counter]]] = {}
        self._caches: _CacheCollector | None = None
        self._cache_files: _CacheFiles | None = None  # (api_processes > 1)

    def add_model(self, name: str, engine: EngineCore, task: str) -> None:
        """A served model's engine values and batches: embedding_* for embedding models, embedding_rerank_*
        (pairs instead of texts) for rerankers, embedding_sparse_* for sparse models, embedding_multivector_* for
        multi-vector (ColBERT) ones; each series labelled
        with the model's served name."""
        if task not in self._tasks:
            self._tasks[task] = self._task_metrics(task)
        collector, (size_h, tokens_h, seconds_h, items_c, item_tokens_c) = self._tasks[task]
        collector.engines.append((name, engine))
        result_cache = getattr(engine, "result_cache", None)
        if result_cache is not None:
            if self._caches is None:
                self._caches = _CacheCollector()
                self.registry.register(self._caches)
                if self._shared is not None:
                    self._cache_files = _CacheFiles(self._caches.caches)
            self._caches.caches.append((name, result_cache))
        size, tokens, seconds = size_h.labels(name), tokens_h.labels(name), seconds_h.labels(name)
        items, item_tokens = items_c.labels(name), item_tokens_c.labels(name)

        def observe(n: int, n_tokens: int, took: float) -> None:
            size.observe(n)
            tokens.observe(n_tokens)
            seconds.observe(took)
            items.inc(n)
            item_tokens.inc(n_tokens)

        previous = engine.on_batch

        def on_batch(n: int, n_tokens: int, took: float) -> None:
            observe(n, n_tokens, took)
            if previous is not None:
                previous(n, n_tokens, took)

        engine.on_batch = on_batch

    def _task_metrics(self, task: str) -> tuple[_EngineCollector, tuple[Histogram, Histogram, Histogram, Counter,
                                                                          Counter]]:
        reg, model = self.registry, ["model"]
        if task == "rerank":
            p, what, unit = "embedding_rerank", "the reranker", "Pairs"
            items = Counter("embedding_rerank_pairs", "(query, document) pairs scored", model, registry=reg)
            item_tokens = Counter("embedding_rerank_tokens", "Tokens of the pairs scored", model, registry=reg)
        elif task == "sparse":
            p, what, unit = "embedding_sparse", "the sparse model", "Sequences"
            items = Counter("embedding_sparse_texts", "Texts given sparse vectors", model, registry=reg)
            item_tokens = Counter("embedding_sparse_tokens", "Tokens given sparse vectors", model, registry=reg)
        elif task == "multivector":
            p, what, unit = "embedding_multivector", "the multi-vector model", "Sequences"
            items = Counter("embedding_multivector_texts", "Texts given token vectors (queries, documents)", model,
                            registry=reg)
            item_tokens = Counter("embedding_multivector_tokens", "Tokens given token vectors (markers and query "
                                  "expansion included)", model, registry=reg)
        else:
            p, what, unit = "embedding", "the engine", "Sequences"
            items = Counter("embedding_texts", "Texts (sequences) embedded", model, registry=reg)
            item_tokens = Counter("embedding_tokens", "Tokens embedded", model, registry=reg)
        collector = _EngineCollector(p)
        reg.register(collector)
        if self._shared is not None:
            self._shared.register(collector)
        return collector, (
            Histogram(f"{p}_batch_size", f"{unit} per batch run by {what}", model, buckets=BATCH_SIZE_BUCKETS,
                      registry=reg),
            Histogram(f"{p}_batch_tokens", f"Tokens per batch run by {what}", model, buckets=BATCH_TOKEN_BUCKETS,
                      registry=reg),
            Histogram(f"{p}_batch_compute_seconds", f"Compute time per batch of {what}", model,
                      buckets=COMPUTE_BUCKETS, registry=reg),
            items, item_tokens)

    def observe_request(self, route: str, method: str, status: int, seconds: float,
                        error_kind: str | None = None) -> None:
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:  # label lookups cost more than the update itself: do each once
            children = (self.requests.labels(route, method, str(status)), self.request_seconds.labels(route))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if error_kind is not None:
            errors = self._error_children.get((route, error_kind))
            if errors is None:
                errors = self._error_children[(route, error_kind)] = self.errors.labels(route, error_kind)
            errors.inc()
        if self._cache_files is not None:
            self._cache_files.sync()

    def render(self) -> bytes:
        """The registry in Prometheus text format (CONTENT_TYPE)."""
        return generate_latest(self.registry if self._shared is None else self._shared)


def use_multiprocess_files(folder: str) -> None:
    """From now on this process's counters, histograms and gauges live in `folder`'s files (and so do those of
    processes started after, which inherit the variable): prometheus-client reads it when first imported."""
    import os

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    prometheus_values.ValueClass = prometheus_values.get_value_class()


class QueueGauges:
    """The engine process's queue depths, written to the multiprocess files every `period_s` (api_processes > 1),
    under each task's prefix (embedding_queue_*, embedding_rerank_queue_*)."""

    def __init__(self, models: Sequence[tuple[str, EngineCore, str]], period_s: float = 0.25) -> None:
        self.period_s = period_s
        self.models: list[tuple[str, EngineCore, Gauge, Gauge]] = []
        made: dict[str, tuple[Gauge, Gauge]] = {}
        for name, engine, task in models:
            p = _PREFIX.get(task, "embedding")
            if p not in made:
                made[p] = (Gauge(f"{p}_queue_requests", "Requests queued or running in the batcher", ["model"],
                                 multiprocess_mode="livemax", registry=None),
                           Gauge(f"{p}_queue_tokens", "Tokens of the requests queued or running", ["model"],
                                 multiprocess_mode="livemax", registry=None))
            self.models.append((name, engine, *made[p]))

    async def run(self) -> None:
        while True:
            for name, engine, requests, tokens in self.models:
                requests.labels(name).set(engine.queued_requests)
                tokens.labels(name).set(engine.queued_tokens)
            await asyncio.sleep(self.period_s)
