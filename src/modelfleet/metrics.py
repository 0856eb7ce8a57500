"""Prometheus metrics of a controller, in a registry of its own (several controllers can live in
one process, as they do in tests).

Names follow Prometheus conventions: ``modelfleet_`` prefix, base units, ``_total`` on counters.
Labels are bounded: ``model`` (capped by ``routing.max_models``) and small fixed reason sets.
Per-model gauges are read from the controller's state at scrape time, so a model that leaves
leaves no stale series behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ControllerMetrics", "ModelFigures"]


@dataclass(frozen=True)
class ModelFigures:
    name: str
    workers: int
    capacity: int
    in_flight: int
    queue_depth: int | None
    consumers: int | None
    routable: bool


class _FleetCollector(Collector):
    def __init__(
        self,
        models: Callable[[], list[ModelFigures]],
        fleet: Callable[[], dict[str, float]],
    ) -> None:
        self._models = models
        self._fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily]:
        per_model = {
            "workers": ("modelfleet_model_workers", "Live workers serving the model"),
            "capacity": ("modelfleet_model_capacity", "Sum of the live workers' concurrency"),
            "in_flight": ("modelfleet_model_in_flight", "Jobs running on the model's workers"),
            "queue_depth": ("modelfleet_queue_ready_messages", "Jobs waiting in the model queue"),
            "consumers": ("modelfleet_queue_consumers", "Consumers of the model queue"),
            "routable": ("modelfleet_model_routable", "1 while the model queue is bound"),
        }
        families = {
            key: GaugeMetricFamily(name, doc, labels=["model"])
            for key, (name, doc) in per_model.items()
        }
        for figures in self._models():
            for key, family in families.items():
                value = getattr(figures, key)
                if value is None:
                    continue
                family.add_metric([figures.name], float(value))
        yield from families.values()
        for name, value in self._fleet().items():
            yield GaugeMetricFamily(name, _FLEET_DOCS.get(name, name), value=value)


_FLEET_DOCS = {
    "modelfleet_workers": "Workers in the registry",
    "modelfleet_controller_listen_only": "1 during the controller's start-up listen window",
    "modelfleet_controller_suspect_broker": "1 while the mass-silence guard holds evictions",
}


class ControllerMetrics:
    """Counters and histograms the controller updates, plus scrape-time gauges."""

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
            "Workers removed from the registry, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "modelfleet_controller_dead_letters",
            "Jobs this controller dead-lettered, by reason",
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

    def attach(
        self, models: Callable[[], list[ModelFigures]], fleet: Callable[[], dict[str, float]]
    ) -> None:
        self.registry.register(_FleetCollector(models, fleet))

    def render(self) -> bytes:
        return generate_latest(self.registry)
