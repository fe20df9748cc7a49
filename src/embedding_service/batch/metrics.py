"""The Batch API's Prometheus metrics, read from the runner at scrape time (no database query per scrape).
The engine side (batch lines queued in each engine, the engine seconds spent on them) is in the engine's own
metrics (../metrics.py): `embedding_queue_background_requests`, `embedding_engine_busy_seconds_total{lane}`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["BatchCollector", "BatchStats"]


@dataclass
class BatchStats:
    """What the runner counts as it goes (since this process started)."""

    lines: Counter[str] = field(default_factory=Counter)  # by outcome: completed, failed
    batches: Counter[str] = field(default_factory=Counter)  # by final status
    active: int = 0  # unfinished batches, every key's, as of the runner's last look
    statuses: Counter[str] = field(default_factory=Counter)  # those, by status
    in_flight: int = 0  # lines inside the app now (queued in an engine's background lane, or running)


class BatchCollector(Collector):
    def __init__(self, stats: BatchStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.stats
        lines = CounterMetricFamily("embedding_batch_lines", "Batch lines run, by outcome", labels=["outcome"])
        for outcome in ("completed", "failed"):
            lines.add_metric([outcome], s.lines[outcome])
        yield lines
        batches = CounterMetricFamily("embedding_batch_batches", "Batches ended, by final status", labels=["status"])
        for status in ("completed", "failed", "cancelled", "expired"):
            batches.add_metric([status], s.batches[status])
        yield batches
        yield GaugeMetricFamily("embedding_batch_active", "Unfinished batches (validating, running, finishing)",
                                value=s.active)
        unfinished = GaugeMetricFamily("embedding_batch_unfinished", "Unfinished batches, by status (as of the "
                                       "runner's last step)", labels=["status"])
        for status in ("validating", "in_progress", "finalizing", "cancelling"):
            unfinished.add_metric([status], s.statuses[status])
        yield unfinished
        yield GaugeMetricFamily("embedding_batch_lines_in_flight", "Batch lines inside the server now (waiting "
                                "in an engine's background lane or running)", value=s.in_flight)
