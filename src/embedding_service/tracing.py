"""OpenTelemetry tracing (docs/ops.md, "Tracing"): off unless `otlp_endpoint` is set.

`TRACER` is the switch: None (the default) and every hook in the service is skipped by one attribute test, so a
server without an endpoint creates no span and no context, and does not import opentelemetry at all (it is an
optional extra, `tracing`). `configure()` sets it once per server process, before the app is built.

Spans: the HTTP request (server span, api/middleware/tracing.py, continuing a caller's W3C `traceparent`),
`tokenize`, `queue` (the wait for a batch), `batch` (one per engine batch: its parent is the oldest sampled
request it carried, and it links to every sampled request span in it) with `forward` (the model) inside it, and
`serialize`. Spans go to a BatchSpanProcessor: a bounded queue drained by its own thread, so a collector that is
down costs dropped spans, never a blocked request or growing memory.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

__all__ = ["MISSING", "TRACER", "configure", "missing", "shutdown", "span"]

log = logging.getLogger("embedding_service")
T = TypeVar("T")

TRACER: Any = None  # an opentelemetry Tracer once configure() ran; None: tracing is off
_provider: Any = None
NO_SPAN = contextlib.nullcontext()  # one shared object: entering it allocates nothing
MISSING = ("--otlp-endpoint needs the tracing extra: pip install 'embedding-service[tracing]' "
           "(opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http)")
QUEUE_SPANS = 2048  # spans waiting for export at most; past it new ones are dropped (the SDK counts them)
EXIT_FLUSH_S = 2.0  # at exit, what is queued gets this long to reach the collector, no longer


def missing() -> str | None:
    """The one-line reason tracing cannot be turned on here (its packages are not installed), else None."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return MISSING
    return None


def traces_url(endpoint: str) -> str:
    """The collector's OTLP/HTTP traces URL: a base URL (http://collector:4318) gets the signal's path."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"


def configure(endpoint: str, service_name: str, sample_ratio: float) -> None:
    """Turn tracing on in this process: spans sampled at `sample_ratio` for new traces (a caller's sampled flag
    is followed), exported over OTLP/HTTP to `endpoint`. Raises ImportError (MISSING) without the extra."""
    global TRACER, _provider
    if (reason := missing()) is not None:
        raise ImportError(reason)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}),
                              sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint)),
                                                   max_queue_size=QUEUE_SPANS))
    _provider = provider  # (not the global provider: nothing else in the process is meant to trace into it)
    TRACER = provider.get_tracer("embedding_service")
    log.info("tracing: OTLP/HTTP to %s as %r, sampling %.3g of new traces", traces_url(endpoint), service_name,
             sample_ratio)


def shutdown() -> None:
    """Send what is queued, waiting at most EXIT_FLUSH_S: a collector that is down must not hold up the exit
    (the SDK's own shutdown waits up to 30 s, retrying)."""
    global TRACER, _provider
    provider, _provider, TRACER = _provider, None, None
    if provider is not None:
        closer = threading.Thread(target=provider.shutdown, name="trace-flush", daemon=True)
        closer.start()
        closer.join(EXIT_FLUSH_S)


def span(name: str, attributes: Mapping[str, Any] | None = None) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one, made current in the block (yields the span); off: a shared no-op."""
    if TRACER is None or not _recording():
        return NO_SPAN  # (under a request that is not sampled no child is: making them cost ~20 µs each)
    return TRACER.start_as_current_span(name, attributes=attributes)


def _recording() -> bool:
    from opentelemetry import trace

    return bool(trace.get_current_span().is_recording())


def set_attributes(attributes: Mapping[str, Any]) -> None:
    """Add to the current span (the request's, in a handler). Callers test TRACER first."""
    from opentelemetry import trace

    trace.get_current_span().set_attributes(attributes)


def current_span_context() -> Any:
    """The current span's context, for a batch to link to (callers test TRACER first)."""
    from opentelemetry import trace

    return trace.get_current_span().get_span_context()


async def traced_wait(submit: Callable[[T], Any], seqs: T, model: str, count: int) -> Any:
    """`await submit(seqs)` (the batcher's) with a `queue` span from the submission to its batch's start, as
    the batcher measured it (rows, queue seconds, compute seconds)."""
    from opentelemetry.trace import Status, StatusCode

    if not _recording():
        return await submit(seqs)
    started_ns = time.time_ns()
    attributes = {"embedding.model": model, "embedding.sequences": count}
    try:
        result = await submit(seqs)
    except BaseException as exc:
        queue = TRACER.start_span("queue", start_time=started_ns, attributes=attributes)
        queue.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        queue.end()
        raise
    queue = TRACER.start_span("queue", start_time=started_ns, attributes=attributes)
    queue.end(end_time=started_ns + int(result[1] * 1e9))
    return result


def start_batch(traces: Iterable[Any], size: int, tokens: int) -> Any:
    """The `batch` span of a batch whose requests' span contexts are `traces` (None for untraced requests):
    in the trace of the oldest sampled request, linked to every sampled one. None when none is sampled."""
    from opentelemetry import trace
    from opentelemetry.trace import Link

    sampled = list({each.span_id: each for each in traces if each is not None and each.trace_flags.sampled}
                   .values())  # (a request's sequences may fill several rows: one link each)
    if not sampled:
        return None
    try:  # (on the batcher's loop: a tracing failure must cost the span, never the batch)
        parent = trace.set_span_in_context(trace.NonRecordingSpan(sampled[0]))
        return TRACER.start_span("batch", context=parent, links=[Link(each) for each in sampled],
                                 attributes={"embedding.batch.size": size, "embedding.batch.tokens": tokens,
                                             "embedding.batch.requests": len(sampled)})
    except Exception:
        log.exception("tracing: no span for this batch")
        return None


def forward_in(batch: Any, embed: Callable[[Sequence[Sequence[int]]], T]) -> Callable[[Sequence[Sequence[int]]], T]:
    """`embed` wrapped in a `forward` span, child of `batch` (it runs on a compute thread: the context is
    passed, not inherited)."""
    from opentelemetry import trace

    context = trace.set_span_in_context(batch)

    def forward(seqs: Sequence[Sequence[int]]) -> T:
        with TRACER.start_as_current_span("forward", context=context):
            return embed(seqs)

    return forward


def end_batch(batch: Any, error: BaseException | None) -> None:
    from opentelemetry.trace import Status, StatusCode

    if error is not None:
        batch.set_status(Status(StatusCode.ERROR, type(error).__name__))
    batch.end()
