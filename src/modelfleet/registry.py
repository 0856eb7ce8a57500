"""The controller's registry of workers: pure state, clock injected, no I/O.

The registry is soft state: everything in it comes from heartbeats and is rebuilt from the next
ones after a restart. It answers three questions — who is alive, what does each model have
(workers, capacity, in-flight), and whom should the sweeper evict — and the routing table
(:mod:`modelfleet.routing`) turns its answers into bind/unbind/drain actions.

Heartbeats of one worker id are ordered by ``(started_at, seq)``: a worker restarted with the
same id starts its ``seq`` at 1 again, and its first heartbeat (a later ``started_at``) replaces
the old entry at once; a heartbeat of an older incarnation is ignored.

Mass silence and how it ends. When most of a fleet goes quiet at once, the broker (a memory
alarm, a partition) is the likelier culprit, so :meth:`Registry.sweep` holds evictions. The
controller publishes a probe to the heartbeats fanout exchange every heartbeat interval and
notes when it comes back (``vouched_at``). The probe travels the same exchange and queue as the
heartbeats, in order: a probe that came back *after* a worker's deadline (last heartbeat +
``timeout_s``) proves the broker carried fanout traffic while that worker said nothing, so the
worker is really gone and is evicted even under mass silence. Workers not vouched for yet stay
held. The bound on evicting a worker that really died, with the broker healthy, is::

    timeout_s + probe interval (heartbeat.interval_s) + probe round trip + sweep_interval_s

counted from its last heartbeat (the next probe after the deadline leaves within one interval,
comes back after one round trip, and the next sweep acts on it).

After broker trouble (:class:`EvictionHold`): while the probe does not come back nobody is
evicted; when it comes back after a gap, or the controller's connection is re-established,
evictions wait ``timeout_s + RECONNECT_ALLOWANCE_TIMEOUTS * timeout_s`` more, so a whole fleet
reconnecting after a broker restart is not evicted at once. A worker that really died in the
outage is then evicted at most::

    T + (1 + RECONNECT_ALLOWANCE_TIMEOUTS) * timeout_s + sweep_interval_s

after the moment T the broker is healthy again (the probe back), and its model gets NO_WORKER
``routing.no_worker_grace_s`` after that (the model is unbound then, and its backlog drained).

A heartbeat whose ``started_at`` lies more than ``MAX_STARTED_AHEAD_S`` ahead of the
controller's wall clock is refused (:func:`started_at_plausible`): the later incarnation wins,
so one forged or skewed far-future start time would hide the real worker of that id.

>>> registry = Registry()
>>> registry.observe(heartbeat, now=time.monotonic())
>>> registry.sweep(now=time.monotonic(), timeout_s=6.0, vouched_at=probe_seen_at)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from modelfleet.messages import Heartbeat, JobCounters, WorkerState

__all__ = [
    "MAX_STARTED_AHEAD_S",
    "RECONNECT_ALLOWANCE_TIMEOUTS",
    "EvictionHold",
    "EvictionReason",
    "ModelView",
    "Observation",
    "Registry",
    "SweepResult",
    "WorkerInfo",
    "started_at_plausible",
]

# A worker's started_at (its wall clock) may be this far ahead of the controller's: clock skew
# between hosts is seconds; more is a broken clock or a forgery.
MAX_STARTED_AHEAD_S = 300.0
# After broker trouble, how many extra heartbeat timeouts the fleet gets to reconnect before
# anyone is evicted: thousands of workers reconnecting to a restarted broker (with their
# backoff) can take longer than one timeout, and evicting them all at once would unbind every
# model and answer NO_WORKER fleet-wide.
RECONNECT_ALLOWANCE_TIMEOUTS = 1.0


def started_at_plausible(started_at: float, wall_now: float) -> bool:
    """Whether a heartbeat's ``started_at`` is not implausibly far in the future."""
    return started_at <= wall_now + MAX_STARTED_AHEAD_S


class EvictionHold:
    """When evictions may start again after broker trouble (pure; monotonic clock).

    ``broker_silent(now)``: the controller's probe is overdue — hold for one timeout from now
    (renewed while it stays overdue). ``broker_back(now)``: the probe returned after a gap, or
    the connection was re-established — hold for ``timeout_s`` plus the reconnect allowance.
    A hold is only ever extended, never cut short."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.until = 0.0

    def broker_silent(self, now: float) -> None:
        self.until = max(self.until, now + self.timeout_s)

    def broker_back(self, now: float) -> None:
        allowance = RECONNECT_ALLOWANCE_TIMEOUTS * self.timeout_s
        self.until = max(self.until, now + self.timeout_s + allowance)

    def allows(self, now: float) -> bool:
        return now >= self.until


class Observation(StrEnum):
    ADDED = "added"
    UPDATED = "updated"
    REMOVED = "removed"  # a clean `stopping` heartbeat
    RESTARTED = "restarted"  # a later incarnation (newer started_at) replaced the entry
    IGNORED = "ignored"  # stale (out of order) or for an unknown stopping worker
    REFUSED = "refused"  # would exceed the models cap


class EvictionReason(StrEnum):
    TIMEOUT = "timeout"
    STOPPING = "stopping"
    STUCK = "stuck"


class WorkerInfo(BaseModel):
    """What the controller knows of one worker (FastChat's WorkerInfo, from heartbeats)."""

    model_config = ConfigDict(frozen=True)

    worker_id: str
    models: tuple[str, ...]
    concurrency: int
    in_flight: int
    oldest_job_age_s: float
    stuck_jobs: int
    state: WorkerState
    speed: float
    host: str
    pid: int
    version: str
    seq: int
    # Wall-clock start of the worker process (its incarnation); orders heartbeats with seq.
    started_at: float = 0.0
    # Monotonic time of the last heartbeat, on the controller's clock.
    last_heartbeat: float
    first_seen: float
    heartbeats: int
    counters: JobCounters
    # Wall-clock lag of the last heartbeat (sent_at -> received), clamped at 0.
    lag_s: float

    def age(self, now: float) -> float:
        return max(0.0, now - self.last_heartbeat)

    @property
    def serving(self) -> bool:
        """Takes jobs: ready (draining workers finish what they hold but take nothing new)."""
        return self.state is WorkerState.READY


@dataclass(frozen=True)
class ModelView:
    """One model's figures across its live workers."""

    name: str
    workers: int
    capacity: int
    in_flight: int


@dataclass(frozen=True)
class SweepResult:
    evicted: tuple[WorkerInfo, ...] = ()
    # Set while most of the fleet is silent at once and some silent workers are held: the
    # broker, not the workers, is suspect, and those workers were not evicted.
    suspect_broker: bool = False
    silent: tuple[str, ...] = field(default=())
    # Silent workers kept (mass silence, not vouched for by a later probe).
    held: tuple[str, ...] = field(default=())


class Registry:
    """Workers by id, updated from heartbeats. Not thread-safe; one event loop owns it."""

    def __init__(self, *, max_models: int = 1_000) -> None:
        self._workers: dict[str, WorkerInfo] = {}
        # Workers per model, kept with every change: the models cap and model lookups cost
        # O(models of one heartbeat), not O(fleet) (10,000 workers register in about a second).
        self._model_workers: Counter[str] = Counter()
        # Serving (ready) workers per model, kept the same way: routing asks per message.
        self._serving_workers: Counter[str] = Counter()
        self._max_models = max_models

    def _store(self, info: WorkerInfo) -> None:
        previous = self._workers.get(info.worker_id)
        self._workers[info.worker_id] = info
        if previous is not None and previous.models == info.models and previous.state is info.state:
            return  # the usual heartbeat: nothing to recount
        if previous is not None:
            self._uncount(previous)
        self._model_workers.update(info.models)
        if info.serving:
            self._serving_workers.update(info.models)

    @staticmethod
    def _decrement(counts: Counter[str], models: tuple[str, ...]) -> None:
        for model in models:
            counts[model] -= 1
            if counts[model] <= 0:
                del counts[model]

    def _uncount(self, info: WorkerInfo) -> None:
        self._decrement(self._model_workers, info.models)
        if info.serving:
            self._decrement(self._serving_workers, info.models)

    def _delete(self, worker_id: str) -> WorkerInfo | None:
        info = self._workers.pop(worker_id, None)
        if info is not None:
            self._uncount(info)
        return info

    def serves(self, model: str) -> bool:
        """Whether any registered worker (ready or not) announced ``model``."""
        return self._model_workers.get(model, 0) > 0

    def serving(self, model: str) -> bool:
        """Whether a ready worker serves ``model`` (O(1): kept with every change)."""
        return self._serving_workers.get(model, 0) > 0

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def get(self, worker_id: str) -> WorkerInfo | None:
        return self._workers.get(worker_id)

    def workers(self) -> list[WorkerInfo]:
        return sorted(self._workers.values(), key=lambda w: w.worker_id)

    def observe(self, hb: Heartbeat, *, now: float, wall_now: float | None = None) -> Observation:
        """Record a heartbeat received at monotonic time ``now``.

        Ordered by ``(started_at, seq)``: a later incarnation replaces the entry at once
        (:attr:`Observation.RESTARTED`), an earlier one is ignored."""
        previous = self._workers.get(hb.worker_id)
        restarted = False
        if previous is not None:
            if hb.started_at < previous.started_at:
                return Observation.IGNORED  # an older incarnation, late or replayed
            restarted = hb.started_at > previous.started_at
        if hb.state is WorkerState.STOPPING:
            if previous is None:
                return Observation.IGNORED
            self._delete(hb.worker_id)
            return Observation.REMOVED
        if previous is not None and not restarted and hb.seq < previous.seq:
            return Observation.IGNORED
        if previous is None or set(hb.models) - set(previous.models):
            # The worker's own previous models are replaced, not added to: leave them out.
            own = set(previous.models) if previous is not None else set()
            counts = self._model_workers
            others = len(counts) - sum(1 for m in own if counts[m] == 1)
            new = sum(1 for m in set(hb.models) if counts.get(m, 0) - (m in own) <= 0)
            if others + new > self._max_models:
                return Observation.REFUSED
        lag = 0.0 if wall_now is None else max(0.0, wall_now - hb.sent_at)
        info = WorkerInfo(
            worker_id=hb.worker_id,
            models=hb.models,
            concurrency=hb.concurrency,
            in_flight=hb.in_flight,
            oldest_job_age_s=hb.oldest_job_age_s,
            stuck_jobs=hb.stuck_jobs,
            state=hb.state,
            speed=hb.speed,
            host=hb.host,
            pid=hb.pid,
            version=hb.version,
            seq=hb.seq,
            started_at=hb.started_at,
            last_heartbeat=now,
            first_seen=now if previous is None or restarted else previous.first_seen,
            heartbeats=1 if previous is None or restarted else previous.heartbeats + 1,
            counters=hb.counters,
            lag_s=lag,
        )
        self._store(info)
        if previous is None:
            return Observation.ADDED
        return Observation.RESTARTED if restarted else Observation.UPDATED

    def remove(self, worker_id: str) -> WorkerInfo | None:
        return self._delete(worker_id)

    def silent(self, *, now: float, timeout_s: float) -> list[WorkerInfo]:
        """Workers whose last heartbeat is older than ``timeout_s``."""
        return [w for w in self._workers.values() if now - w.last_heartbeat > timeout_s]

    def sweep(
        self,
        *,
        now: float,
        timeout_s: float,
        guard_ratio: float = 0.5,
        guard_min_workers: int = 3,
        evict: bool = True,
        quiet_after_s: float | None = None,
        vouched_at: float | None = None,
    ) -> SweepResult:
        """Evict workers silent longer than ``timeout_s``.

        Mass-silence guard: in a fleet of at least ``guard_min_workers``, when more than
        ``guard_ratio`` of the workers are silent at once, nothing is evicted — a memory alarm or a
        partition stops every heartbeat together, and evicting the whole fleet would turn a
        broker hiccup into NO_WORKER errors for everyone. Heartbeats run at different phases, so
        the guard counts workers *quiet* for ``quiet_after_s`` (default half the timeout), not
        only those already past the timeout: a fleet-wide silence is recognised before the
        first worker of it times out, not after half of it has been evicted one by one.

        The guard ends on its own: ``vouched_at`` is when the controller's own probe last came
        back through the heartbeats exchange (same clock as ``now``). A silent worker whose
        deadline (last heartbeat + ``timeout_s``) lies before ``vouched_at`` is evicted even
        under mass silence: the broker carried fanout traffic after it went quiet. The others
        are held, and ``suspect_broker`` is set only while some are held. ``evict=False`` only
        reports.
        """
        silent = self.silent(now=now, timeout_s=timeout_s)
        ids = tuple(sorted(w.worker_id for w in silent))
        if not silent:
            return SweepResult()
        total = len(self._workers)
        quiet_after = timeout_s / 2 if quiet_after_s is None else quiet_after_s
        quiet = sum(1 for w in self._workers.values() if now - w.last_heartbeat > quiet_after)
        held: list[WorkerInfo] = []
        if total >= guard_min_workers and quiet > guard_ratio * total:
            gone: list[WorkerInfo] = []
            for worker in silent:
                vouched = vouched_at is not None and vouched_at > worker.last_heartbeat + timeout_s
                (gone if vouched else held).append(worker)
            silent = gone
        held_ids = tuple(sorted(w.worker_id for w in held))
        if not evict or not silent:
            return SweepResult(suspect_broker=bool(held), silent=ids, held=held_ids)
        for worker in silent:
            self._delete(worker.worker_id)
        return SweepResult(
            evicted=tuple(sorted(silent, key=lambda w: w.worker_id)),
            suspect_broker=bool(held),
            silent=ids,
            held=held_ids,
        )

    def model_names(self) -> set[str]:
        return set(self._model_workers)

    def live_models(self) -> set[str]:
        """Models with at least one worker taking jobs (O(models), not O(fleet))."""
        return set(self._serving_workers)

    def models(self) -> dict[str, ModelView]:
        figures: dict[str, list[int]] = {}
        for worker in self._workers.values():
            for model in worker.models:
                entry = figures.setdefault(model, [0, 0, 0])
                if worker.serving:
                    entry[0] += 1
                    entry[1] += worker.concurrency
                entry[2] += worker.in_flight
        return {
            name: ModelView(name=name, workers=w, capacity=c, in_flight=f)
            for name, (w, c, f) in sorted(figures.items())
        }

    def workers_of(self, model: str) -> Iterable[WorkerInfo]:
        return (w for w in self._workers.values() if model in w.models)
