"""Fleet job statistics: cumulative worker figures -> monotonic fleet counters (no broker)."""

from __future__ import annotations

from modelfleet.stats import DURATION_BUCKETS, FleetStats, ModelStats, Outcome, WorkerStats


def _snapshot(
    ok: int = 0, errors: int = 0, durations: tuple[float, ...] = ()
) -> dict[str, ModelStats]:
    stats = WorkerStats(("m",))
    for _ in range(ok):
        stats.job_done("m", Outcome.OK, 0.02)
    for _ in range(errors):
        stats.job_done("m", Outcome.WORKER_ERROR, 0.02)
    for value in durations:
        stats.job_started("m", value)
    return stats.snapshot()


def test_worker_stats_bucket_each_observation() -> None:
    stats = WorkerStats(("m",))
    stats.job_done("m", Outcome.OK, 0.003)  # first bucket (<= 5 ms)
    stats.job_done("m", Outcome.OK, 0.005)  # boundary value lands in its own bucket
    stats.job_done("m", Outcome.TIMEOUT, 10_000)  # overflow (+Inf)
    stats.job_done("unknown-model", Outcome.OK, 1)  # ignored: not served
    snap = stats.snapshot()["m"]
    assert snap.jobs == {Outcome.OK: 2, Outcome.TIMEOUT: 1}
    assert snap.duration.counts[0] == 2 and snap.duration.counts[-1] == 1
    assert sum(snap.duration.counts) == 3
    assert abs(snap.duration.sum - 10_000.008) < 1e-6


def test_fleet_adds_differences_between_heartbeats() -> None:
    fleet = FleetStats()
    fleet.update("w1", _snapshot(ok=3))
    fleet.update("w1", _snapshot(ok=5))
    fleet.update("w2", _snapshot(ok=2, errors=1))
    totals = fleet.models["m"]
    assert totals.jobs[Outcome.OK] == 7
    assert totals.jobs[Outcome.WORKER_ERROR] == 1
    assert sum(totals.duration.counts) == 8


def test_worker_restart_with_same_id_never_decreases_totals() -> None:
    fleet = FleetStats()
    fleet.update("w1", _snapshot(ok=10))
    fleet.update("w1", _snapshot(ok=2))  # restarted: counts began again at 0
    assert fleet.models["m"].jobs[Outcome.OK] == 12
    fleet.update("w1", _snapshot(ok=4))
    assert fleet.models["m"].jobs[Outcome.OK] == 14


def test_returning_worker_is_not_counted_twice() -> None:
    fleet = FleetStats()
    fleet.update("w1", _snapshot(ok=10))
    # evicted (SIGSTOP) then resumed: same cumulative figures come again
    fleet.update("w1", _snapshot(ok=10))
    assert fleet.models["m"].jobs[Outcome.OK] == 10


def test_histogram_is_cumulative_in_prometheus_form() -> None:
    fleet = FleetStats()
    fleet.update("w1", _snapshot(durations=(0.001, 0.2, 1000.0)))
    buckets = fleet.models["m"].queue_wait.cumulative()
    assert len(buckets) == len(DURATION_BUCKETS) + 1
    assert buckets[0] == ("0.005", 1.0)
    assert buckets[-1] == ("+Inf", 3.0)
    values = [v for _, v in buckets]
    assert values == sorted(values)


def test_model_cap_bounds_label_set() -> None:
    fleet = FleetStats(max_models=1)
    fleet.update("w1", _snapshot(ok=1))
    other = WorkerStats(("n",))
    other.job_done("n", Outcome.OK, 0.1)
    fleet.update("w2", other.snapshot())
    assert set(fleet.models) == {"m"}


def test_baselines_are_bounded() -> None:
    fleet = FleetStats(max_baselines=2)
    for worker in ("a", "b", "c"):
        fleet.update(worker, _snapshot(ok=1))
    assert len(fleet._baselines) == 2
    assert fleet.models["m"].jobs[Outcome.OK] == 3
