"""Prometheus metrics of a controller, in a registry of its own (several controllers can live in
one process, as they do in tests).

Names follow Prometheus conventions: ``modelfleet_`` prefix, base units, ``_total`` on counters,
``_seconds`` on durations. Labels are bounded: ``model`` (capped by ``routing.max_models``; dead
letters for models nobody serves are counted under ``model="other"``), small fixed
``reason``/``outcome``/``cause`` sets, and ``worker`` only while the fleet has at most
``metrics.max_worker_series`` workers.

Scrape-time figures (per-model gauges, fleet job counters and histograms summed from heartbeats,
per-worker gauges) are read from the controller's state when Prometheus scrapes, so a model or
worker that leaves leaves no stale series behind. Several controllers export the same figures:
dashboards take ``max``, never ``sum``, across controllers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from modelfleet.stats import FleetStats, Outcome

# The `_created` series prometheus-client adds to every counter and histogram double the series
# count and no dashboard reads them (the switch is process-wide; only controllers import this).
disable_created_metrics()  # type: ignore[no-untyped-call]

__all__ = [
    "EVICTION_REASONS",
    "HEARTBEAT_INVALID_CAUSES",
    "REPLY_REFUSED_REASONS",
    "ROUTING_ACTIONS",
    "ControllerMetrics",
    "MetricsSource",
    "ModelFigures",
    "WorkerFigures",
]

# Label values known in advance: each series is exported at 0 from the start.
HEARTBEAT_INVALID_CAUSES = (
    "not_json",
    "schema",
    "version",
    "too_large",
    "models_cap",
    "user",
    "clock",
)
EVICTION_REASONS = ("timeout", "stopping", "stuck")
ROUTING_ACTIONS = ("bind", "unbind")
# reply_to is not a broker-issued direct reply-to address (modelfleet.addressing).
REPLY_REFUSED_REASONS = ("not_direct_reply_to",)


@dataclass(frozen=True)
class ModelFigures:
    name: str
    workers: int
    capacity: int
    in_flight: int
    queue_depth: int | None
    consumers: int | None
    routable: bool


@dataclass(frozen=True)
class WorkerFigures:
    worker_id: str
    in_flight: int
    concurrency: int
    heartbeat_age_s: float
    stuck_jobs: int


class MetricsSource(Protocol):
    """What the scrape-time collector reads (the controller implements it)."""

    fleet_stats: FleetStats

    def model_figures(self) -> list[ModelFigures]: ...

    def fleet_figures(self) -> dict[str, float]: ...

    def worker_figures(self) -> list[WorkerFigures] | None: ...


_PER_MODEL = {
    "workers": ("modelfleet_model_workers", "Live workers serving the model"),
    "capacity": ("modelfleet_model_capacity", "Sum of the live workers' concurrency"),
    "in_flight": ("modelfleet_model_in_flight", "Jobs running on the model's workers"),
    "queue_depth": ("modelfleet_queue_ready_messages", "Jobs waiting in the model queue"),
    "consumers": ("modelfleet_queue_consumers", "Consumers of the model queue"),
    "routable": (
        "modelfleet_model_routable",
        "1 while the model queue is bound to the jobs exchange",
    ),
}

_PER_WORKER = {
    "in_flight": ("modelfleet_worker_in_flight", "Jobs running on the worker"),
    "concurrency": ("modelfleet_worker_concurrency", "Jobs the worker runs at most"),
    "heartbeat_age_s": (
        "modelfleet_worker_heartbeat_age_seconds",
        "Time since the worker's last heartbeat",
    ),
    "stuck_jobs": ("modelfleet_worker_stuck_jobs", "Jobs running longer than worker.stuck_after_s"),
}

_FLEET_DOCS = {
    "modelfleet_workers": "Workers in the registry",
    "modelfleet_controller_listen_only": "1 during the controller's start-up listen window",
    "modelfleet_controller_suspect_broker": "1 while the mass-silence guard holds evictions",
    "modelfleet_controller_heartbeat_consumer_up": "1 while the heartbeat consumer is registered",
}

_HISTOGRAMS = {
    "duration": ("modelfleet_job_duration_seconds", "Time a worker spent on a job"),
    "queue_wait": (
        "modelfleet_job_queue_wait_seconds",
        "Time from a job's publish to its start on a worker",
    ),
    "first_chunk": (
        "modelfleet_job_first_chunk_seconds",
        "Time from a streamed job's publish to its first chunk",
    ),
}


class _FleetCollector(Collector):
    def __init__(self, source: MetricsSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        families = {
            key: GaugeMetricFamily(name, doc, labels=["model"])
            for key, (name, doc) in _PER_MODEL.items()
        }
        for figures in self._source.model_figures():
            for key, family in families.items():
                value = getattr(figures, key)
                if value is not None:
                    family.add_metric([figures.name], float(value))
        yield from families.values()

        for name, value in self._source.fleet_figures().items():
            yield GaugeMetricFamily(name, _FLEET_DOCS.get(name, name), value=value)

        stats = self._source.fleet_stats
        jobs = CounterMetricFamily(
            "modelfleet_jobs",
            "Jobs finished by workers, by outcome (summed from heartbeats)",
            labels=["model", "outcome"],
        )
        histograms = {
            key: HistogramMetricFamily(name, doc, labels=["model"])
            for key, (name, doc) in _HISTOGRAMS.items()
        }
        for model, totals in sorted(stats.models.items()):
            for outcome in Outcome:
                jobs.add_metric([model, outcome.value], totals.jobs[outcome])
            for key, histogram in histograms.items():
                data = getattr(totals, key)
                histogram.add_metric([model], data.cumulative(), data.sum)
        yield jobs
        yield from histograms.values()

        workers = self._source.worker_figures()
        if workers is not None:
            per_worker = {
                key: GaugeMetricFamily(name, doc, labels=["worker"])
                for key, (name, doc) in _PER_WORKER.items()
            }
            for worker in workers:
                for key, gauge in per_worker.items():
                    gauge.add_metric([worker.worker_id], float(getattr(worker, key)))
            yield from per_worker.values()


class ControllerMetrics:
    """Counters and histograms the controller updates, plus scrape-time figures."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.heartbeats = Counter(
            "modelfleet_heartbeats_received", "Valid heartbeats received", registry=self.registry
        )
        self.heartbeats_invalid = Counter(
            "modelfleet_heartbeats_invalid",
            "Heartbeats dropped, by cause",
            ["cause"],
            registry=self.registry,
        )
        self.heartbeat_lag = Histogram(
            "modelfleet_heartbeat_lag_seconds",
            "Delay from a worker sending a heartbeat to the controller reading it",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )
        self.evictions = Counter(
            "modelfleet_evictions",
            "Workers removed from the registry, by reason (timeout, stopping, stuck)",
            ["reason"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "modelfleet_dead_letters",
            "Jobs that reached the dead-letter exchange, by model and reason",
            ["model", "reason"],
            registry=self.registry,
        )
        self.controller_dead_letters = Counter(
            "modelfleet_controller_dead_letters",
            "Jobs this controller itself dead-lettered (NO_WORKER answers), by reason",
            ["reason"],
            registry=self.registry,
        )
        self.routing_changes = Counter(
            "modelfleet_routing_changes",
            "Bind/unbind actions executed",
            ["action"],
            registry=self.registry,
        )
        self.sweep_duration = Histogram(
            "modelfleet_sweep_duration_seconds",
            "Time one sweep (evictions + routing plan) takes",
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1),
            registry=self.registry,
        )
        self.replies_refused = Counter(
            "modelfleet_replies_refused",
            "Error replies not sent because the job's reply_to is not a direct reply-to address",
            ["reason"],
            registry=self.registry,
        )
        self.catalog_names_invalid = Counter(
            "modelfleet_catalog_names_invalid",
            "Model names read back from the catalog that fail the model-name rule (dropped)",
            registry=self.registry,
        )
        # Series that exist from the start, so dashboards show 0 rather than "no data".
        for cause in HEARTBEAT_INVALID_CAUSES:
            self.heartbeats_invalid.labels(cause)
        for reason in EVICTION_REASONS:
            self.evictions.labels(reason)
        for reason in sorted(_DEAD_REASONS | {"other"}):
            self.dead_letters.labels("other", reason)
        self.controller_dead_letters.labels("no_worker")
        for action in ROUTING_ACTIONS:
            self.routing_changes.labels(action)
        for reason in REPLY_REFUSED_REASONS:
            self.replies_refused.labels(reason)

    def attach(self, source: MetricsSource) -> None:
        self.registry.register(_FleetCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def reason_label(reason: str) -> str:
    """Dead-letter reasons outside the known set collapse into ``other`` (bounded labels)."""
    return reason if reason in _DEAD_REASONS else "other"


_DEAD_REASONS = frozenset(
    {
        "no_worker",
        "expired",
        "delivery_limit",
        "worker_error",
        "invalid",
        "overloaded",
        "rejected",
    }
)
