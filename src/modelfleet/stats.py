"""Job statistics: counted by workers, carried in heartbeats, summed by the controller. Pure.

Workers keep cumulative per-model counts (jobs by outcome, and fixed-bucket histograms of job
duration, queue wait and time to first chunk) and send them whole in every heartbeat. The
controller turns them into fleet-wide counters that only ever go up: for each worker it keeps the
last figures it saw and adds the difference. A worker that restarts with the same id (its counts
drop) contributes its new counts from zero; a worker that leaves keeps what it contributed; a
worker that returns after an eviction is not counted twice, because its baseline is kept.

So one scrape of one controller shows the whole fleet, with no negative rates.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DURATION_BUCKETS",
    "FleetStats",
    "HistogramData",
    "ModelStats",
    "Outcome",
    "WorkerStats",
]

# Upper bounds in seconds, shared by workers and controller (a heartbeat carries counts only).
# From 5 ms (an echo) to 10 min (a long generation).
DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip


# Counts arrive in heartbeats from other processes: never negative (a fleet counter must only go
# up), and small enough that summing them as floats cannot overflow (2**53 is exact as a float).
Count = Annotated[int, Field(ge=0, le=2**53)]
# A longer observation (a skewed or forged clock) is recorded as this, so sums stay finite.
MAX_OBSERVATION_S = 1e9


class Outcome(StrEnum):
    OK = "ok"
    WORKER_ERROR = "worker_error"
    INVALID = "invalid"
    TIMEOUT = "timeout"


class HistogramData(BaseModel):
    """Cumulative histogram: ``counts[i]`` jobs fell at or under ``DURATION_BUCKETS[i]`` (not
    cumulative across buckets); ``counts[-1]`` is the overflow (+Inf) bucket."""

    model_config = ConfigDict(frozen=True)

    counts: tuple[Count, ...] = Field(default=(0,) * (len(DURATION_BUCKETS) + 1))
    sum: float = Field(0.0, ge=0, allow_inf_nan=False)

    def valid(self) -> bool:
        return len(self.counts) == len(DURATION_BUCKETS) + 1 and all(c >= 0 for c in self.counts)


class ModelStats(BaseModel):
    """One worker's cumulative figures for one model."""

    model_config = ConfigDict(frozen=True)

    jobs: dict[Outcome, Count] = Field(default_factory=dict)
    duration: HistogramData = HistogramData()
    queue_wait: HistogramData = HistogramData()
    first_chunk: HistogramData = HistogramData()


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        value = min(max(0.0, value), MAX_OBSERVATION_S)
        self.counts[bisect.bisect_left(DURATION_BUCKETS, value)] += 1
        self.total += value

    def data(self) -> HistogramData:
        return HistogramData(counts=tuple(self.counts), sum=self.total)


@dataclass
class _ModelCounts:
    jobs: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    duration: _Histogram = field(default_factory=_Histogram)
    queue_wait: _Histogram = field(default_factory=_Histogram)
    first_chunk: _Histogram = field(default_factory=_Histogram)


class WorkerStats:
    """The worker side: record jobs as they end, snapshot for the heartbeat."""

    def __init__(self, models: tuple[str, ...]) -> None:
        self._models = {m: _ModelCounts() for m in models}

    def job_done(self, model: str, outcome: Outcome, duration_s: float) -> None:
        counts = self._models.get(model)
        if counts is None:
            return
        counts.jobs[outcome] += 1
        counts.duration.observe(duration_s)

    def job_started(self, model: str, queue_wait_s: float) -> None:
        counts = self._models.get(model)
        if counts is not None:
            counts.queue_wait.observe(queue_wait_s)

    def first_chunk(self, model: str, after_s: float) -> None:
        counts = self._models.get(model)
        if counts is not None:
            counts.first_chunk.observe(after_s)

    def snapshot(self) -> dict[str, ModelStats]:
        return {
            model: ModelStats(
                jobs={k: v for k, v in c.jobs.items() if v},
                duration=c.duration.data(),
                queue_wait=c.queue_wait.data(),
                first_chunk=c.first_chunk.data(),
            )
            for model, c in self._models.items()
        }


@dataclass
class FleetHistogram:
    counts: list[float] = field(default_factory=lambda: [0.0] * (len(DURATION_BUCKETS) + 1))
    sum: float = 0.0

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (upper bound, cumulative count), ending with +Inf."""
        out, running = [], 0.0
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@dataclass
class FleetModel:
    jobs: dict[Outcome, float] = field(default_factory=lambda: dict.fromkeys(Outcome, 0.0))
    duration: FleetHistogram = field(default_factory=FleetHistogram)
    queue_wait: FleetHistogram = field(default_factory=FleetHistogram)
    first_chunk: FleetHistogram = field(default_factory=FleetHistogram)


_HISTOGRAMS = ("duration", "queue_wait", "first_chunk")


class FleetStats:
    """The controller side: monotonic fleet totals from workers' cumulative figures.

    ``max_models`` bounds the label set (models beyond it are not tracked); ``max_baselines``
    bounds memory for workers that came and went.
    """

    def __init__(self, *, max_models: int = 1_000, max_baselines: int = 100_000) -> None:
        self.models: dict[str, FleetModel] = {}
        self._baselines: dict[str, dict[str, ModelStats]] = {}
        self._max_models = max_models
        self._max_baselines = max_baselines

    def update(self, worker_id: str, stats: Mapping[str, ModelStats]) -> None:
        previous = self._baselines.pop(worker_id, {})
        for model, now in stats.items():
            if model not in self.models:
                if len(self.models) >= self._max_models:
                    continue
                self.models[model] = FleetModel()
            total = self.models[model]
            before = previous.get(model)
            if before is now or (
                before is not None
                and before.jobs == now.jobs
                and all(getattr(before, h).counts == getattr(now, h).counts for h in _HISTOGRAMS)
            ):
                continue  # an idle worker: nothing new since its last heartbeat (the usual case)
            for outcome, count in now.jobs.items():
                old = before.jobs.get(outcome, 0) if before else 0
                total.jobs[outcome] += count - old if count >= old else count
            for name in _HISTOGRAMS:
                new_h: HistogramData = getattr(now, name)
                if not new_h.valid():
                    continue
                old_h: HistogramData | None = getattr(before, name) if before else None
                if old_h is not None and old_h.counts == new_h.counts:
                    continue
                fleet_h: FleetHistogram = getattr(total, name)
                reset = (
                    old_h is None
                    or not old_h.valid()
                    or any(n < o for n, o in zip(new_h.counts, old_h.counts, strict=True))
                )
                if reset or old_h is None:
                    deltas, dsum = list(new_h.counts), new_h.sum
                else:
                    deltas = [n - o for n, o in zip(new_h.counts, old_h.counts, strict=True)]
                    dsum = max(0.0, new_h.sum - old_h.sum)
                for i, d in enumerate(deltas):
                    fleet_h.counts[i] += d
                fleet_h.sum += dsum
        # Re-inserted last, so the dict's order is least recently updated first.
        self._baselines[worker_id] = dict(stats)
        while len(self._baselines) > self._max_baselines:
            del self._baselines[next(iter(self._baselines))]
