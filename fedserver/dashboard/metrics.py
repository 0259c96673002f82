"""`/metrics`: the run's model in Prometheus's text format, read at each scrape.

One collector over the model in a registry of the dashboard's own (never prometheus-client's
global one), so that two dashboards in one process, or a test's, never share a series.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fedserver.dashboard.model import RunModel

CONTENT_TYPE = CONTENT_TYPE_LATEST


class RunCollector:
    """The metrics of one `RunModel` (see docs/dashboard.md for each name)."""

    def __init__(self, model: RunModel) -> None:
        self.model = model

    def collect(self) -> Iterator[Metric]:
        model = self.model
        _, elapsed, last = model.progress()
        last = last or {}
        yield _gauge("flowerbed_round", "the last committed round", last.get("round", 0))
        yield _gauge("flowerbed_rounds_planned", "the rounds the run is configured for", (self.model.run or {}).get("rounds"))
        yield _gauge("flowerbed_accuracy", "the last evaluated round's accuracy", model.last_known("accuracy"))
        yield _gauge("flowerbed_eval_loss", "the last evaluated round's loss", model.last_known("eval_loss"))
        yield _gauge("flowerbed_train_loss", "the last round's mean training loss", model.last_known("train_loss"))
        yield _gauge("flowerbed_round_seconds", "the last round's own time", last.get("seconds"))
        yield _counter("flowerbed_rounds_seconds", "the committed rounds' time, summed", elapsed)
        yield _gauge("flowerbed_devices_connected", "nodes connected now (a simulation: its virtual nodes)",
                     self.model.connected())  # fmt: skip
        yield _gauge("flowerbed_epsilon", "the privacy budget spent (differential privacy only)", model.last_known("epsilon"))
        yield from _replies(self.model.reply_counts())
        # Scraped on the web server's own thread (an async handler): what serving the dashboard has cost.
        yield _counter("flowerbed_dashboard_cpu_seconds", "CPU time of the thread serving the dashboard", time.thread_time())


def _replies(counts: dict[tuple[str, int | None], int]) -> Iterator[Metric]:
    received = CounterMetricFamily("flowerbed_replies_received", "replies received, whatever became of them")
    received.add_metric([], sum(counts.values()))
    yield received
    refused = CounterMetricFamily(
        "flowerbed_replies_refused", "replies not aggregated, by outcome (screened, refused, failed) and error code",
        labels=["outcome", "code"],
    )  # fmt: skip
    for (outcome, code), count in sorted(counts.items(), key=str):
        if outcome != "accepted":
            refused.add_metric([outcome, "" if code is None else str(code)], count)
    yield refused


def _gauge(name: str, documentation: str, value: float | None) -> GaugeMetricFamily:
    """A gauge, without a sample while its value is unknown."""
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def metrics_text(registry: CollectorRegistry) -> bytes:
    """What `/metrics` serves."""
    return generate_latest(registry)


def registry_for(model: RunModel) -> CollectorRegistry:
    """A registry of its own holding `model`'s collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(model))  # type: ignore[arg-type]
    return registry
