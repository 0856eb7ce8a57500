"""The registry: pure state fed by heartbeats, on an injected clock (plain floats)."""

from __future__ import annotations

from typing import Any

from modelfleet.messages import Heartbeat, WorkerState
from modelfleet.registry import ModelView, Observation, Registry, SweepResult

TIMEOUT = 6.0


def hb(
    worker_id: str,
    models: tuple[str, ...] = ("llama",),
    *,
    seq: int = 0,
    state: WorkerState = WorkerState.READY,
    **fields: Any,
) -> Heartbeat:
    data: dict[str, Any] = {
        "worker_id": worker_id,
        "models": models,
        "concurrency": 4,
        "sent_at": 1_700_000_000.0,
        "interval_s": 2.0,
        "seq": seq,
        "state": state,
    }
    data.update(fields)
    return Heartbeat(**data)


def fleet(*ids: str, now: float = 0.0) -> Registry:
    registry = Registry()
    for worker_id in ids:
        assert registry.observe(hb(worker_id), now=now) is Observation.ADDED
    return registry


# --- observe ----------------------------------------------------------------------------------


def test_first_heartbeat_adds_the_worker() -> None:
    registry = Registry()
    result = registry.observe(hb("w1", ("llama", "mistral"), in_flight=2, host="gpu1"), now=10.0)
    assert result is Observation.ADDED
    assert len(registry) == 1
    assert "w1" in registry
    info = registry.get("w1")
    assert info is not None
    assert info.models == ("llama", "mistral")
    assert info.in_flight == 2
    assert info.host == "gpu1"
    assert info.last_heartbeat == 10.0
    assert info.first_seen == 10.0
    assert info.heartbeats == 1


def test_later_heartbeat_updates_the_worker() -> None:
    registry = fleet("w1", now=10.0)
    result = registry.observe(hb("w1", seq=1, in_flight=3, stuck_jobs=1), now=12.0)
    assert result is Observation.UPDATED
    info = registry.get("w1")
    assert info is not None
    assert info.in_flight == 3
    assert info.stuck_jobs == 1
    assert info.last_heartbeat == 12.0
    assert info.first_seen == 10.0
    assert info.heartbeats == 2
    assert len(registry) == 1


def test_lag_is_wall_clock_delay_clamped_at_zero() -> None:
    registry = Registry()
    registry.observe(hb("w1", sent_at=100.0), now=0.0, wall_now=100.25)
    assert registry.get("w1").lag_s == 0.25  # type: ignore[union-attr]
    registry.observe(hb("w1", seq=1, sent_at=100.0), now=1.0, wall_now=99.0)  # clock skew
    assert registry.get("w1").lag_s == 0.0  # type: ignore[union-attr]


def test_stopping_heartbeat_removes_at_once() -> None:
    registry = fleet("w1", "w2")
    assert registry.observe(hb("w1", seq=1, state=WorkerState.STOPPING), now=1.0) is (
        Observation.REMOVED
    )
    assert "w1" not in registry
    assert [w.worker_id for w in registry.workers()] == ["w2"]


def test_stopping_heartbeat_of_unknown_worker_is_ignored() -> None:
    registry = fleet("w1")
    result = registry.observe(hb("ghost", state=WorkerState.STOPPING), now=1.0)
    assert result is Observation.IGNORED
    assert "ghost" not in registry
    assert len(registry) == 1


def test_out_of_order_heartbeat_is_ignored() -> None:
    registry = Registry()
    registry.observe(hb("w1", seq=5, in_flight=1), now=10.0)
    assert registry.observe(hb("w1", seq=4, in_flight=9), now=11.0) is Observation.IGNORED
    info = registry.get("w1")
    assert info is not None
    assert (info.seq, info.in_flight, info.last_heartbeat, info.heartbeats) == (5, 1, 10.0, 1)


def test_remove_and_workers_of() -> None:
    registry = Registry()
    registry.observe(hb("w1", ("a", "b")), now=0.0)
    registry.observe(hb("w2", ("b",)), now=0.0)
    assert sorted(w.worker_id for w in registry.workers_of("b")) == ["w1", "w2"]
    assert [w.worker_id for w in registry.workers_of("a")] == ["w1"]
    removed = registry.remove("w1")
    assert removed is not None and removed.worker_id == "w1"
    assert registry.remove("w1") is None
    assert registry.model_names() == {"b"}


# --- sweep ------------------------------------------------------------------------------------


def test_sweep_evicts_only_workers_silent_past_the_timeout() -> None:
    registry = fleet("w1", "w2", now=10.0)
    registry.observe(hb("w1", seq=1), now=14.0)
    # At 16.0 w2 is exactly TIMEOUT old: not yet silent.
    assert registry.sweep(now=16.0, timeout_s=TIMEOUT) == SweepResult()
    assert len(registry) == 2
    result = registry.sweep(now=16.5, timeout_s=TIMEOUT)
    assert [w.worker_id for w in result.evicted] == ["w2"]
    assert result.silent == ("w2",)
    assert not result.suspect_broker
    assert "w2" not in registry
    assert "w1" in registry


def test_sweep_of_a_healthy_fleet_does_nothing() -> None:
    registry = fleet("w1", "w2", "w3", now=0.0)
    assert registry.sweep(now=5.9, timeout_s=TIMEOUT) == SweepResult()
    assert len(registry) == 3


def test_sweep_without_evict_reports_but_keeps() -> None:
    registry = fleet("w1", "w2", now=0.0)
    registry.observe(hb("w1", seq=1), now=5.0)
    result = registry.sweep(now=7.0, timeout_s=TIMEOUT, evict=False)
    assert result.evicted == ()
    assert result.silent == ("w2",)
    assert not result.suspect_broker
    assert "w2" in registry
    assert [w.worker_id for w in registry.silent(now=7.0, timeout_s=TIMEOUT)] == ["w2"]


def test_mass_silence_suspects_the_broker_and_evicts_nobody() -> None:
    registry = fleet("w1", "w2", "w3", "w4", now=0.0)
    registry.observe(hb("w4", seq=1), now=5.0)
    result = registry.sweep(now=7.0, timeout_s=TIMEOUT, guard_ratio=0.5, guard_min_workers=3)
    assert result.suspect_broker
    assert result.evicted == ()
    assert result.silent == ("w1", "w2", "w3")
    assert len(registry) == 4


def test_whole_fleet_silent_suspects_the_broker() -> None:
    registry = fleet("w1", "w2", "w3", now=0.0)
    result = registry.sweep(now=100.0, timeout_s=TIMEOUT)
    assert result.suspect_broker
    assert len(registry) == 3


def test_silence_at_exactly_the_guard_ratio_still_evicts() -> None:
    # 2 of 4 silent is not *more* than half: ordinary deaths, evicted.
    registry = fleet("w1", "w2", "w3", "w4", now=0.0)
    registry.observe(hb("w3", seq=1), now=5.0)
    registry.observe(hb("w4", seq=1), now=5.0)
    result = registry.sweep(now=7.0, timeout_s=TIMEOUT)
    assert not result.suspect_broker
    assert [w.worker_id for w in result.evicted] == ["w1", "w2"]
    assert sorted(w.worker_id for w in registry.workers()) == ["w3", "w4"]


def test_small_fleet_is_below_the_guard_and_is_evicted() -> None:
    registry = fleet("w1", "w2", now=0.0)
    result = registry.sweep(now=7.0, timeout_s=TIMEOUT, guard_min_workers=3)
    assert not result.suspect_broker
    assert [w.worker_id for w in result.evicted] == ["w1", "w2"]
    assert len(registry) == 0


def test_guard_min_workers_is_configurable() -> None:
    registry = fleet("w1", "w2", now=0.0)
    result = registry.sweep(now=7.0, timeout_s=TIMEOUT, guard_min_workers=2)
    assert result.suspect_broker
    assert len(registry) == 2


# --- model views ------------------------------------------------------------------------------


def test_live_models_exclude_draining_workers() -> None:
    registry = Registry()
    registry.observe(hb("w1", ("llama",)), now=0.0)
    registry.observe(hb("w2", ("mistral",), state=WorkerState.DRAINING), now=0.0)
    assert registry.live_models() == {"llama"}
    assert registry.model_names() == {"llama", "mistral"}


def test_models_aggregate_serving_capacity_and_all_in_flight() -> None:
    registry = Registry()
    registry.observe(hb("w1", ("llama", "mistral"), concurrency=4, in_flight=1), now=0.0)
    registry.observe(hb("w2", ("llama",), concurrency=8, in_flight=5), now=0.0)
    registry.observe(
        hb("w3", ("llama",), concurrency=16, in_flight=2, state=WorkerState.DRAINING), now=0.0
    )
    registry.observe(
        hb("w4", ("qwen",), concurrency=2, in_flight=2, state=WorkerState.DRAINING), now=0.0
    )
    assert registry.models() == {
        # The draining w3 adds neither a worker nor capacity, but its jobs are still in flight.
        "llama": ModelView(name="llama", workers=2, capacity=12, in_flight=8),
        "mistral": ModelView(name="mistral", workers=1, capacity=4, in_flight=1),
        "qwen": ModelView(name="qwen", workers=0, capacity=0, in_flight=2),
    }
    assert list(registry.models()) == ["llama", "mistral", "qwen"]


def test_worker_that_returns_to_ready_counts_again() -> None:
    registry = Registry()
    registry.observe(hb("w1", state=WorkerState.DRAINING), now=0.0)
    assert registry.live_models() == set()
    registry.observe(hb("w1", seq=1), now=1.0)
    assert registry.live_models() == {"llama"}


# --- models cap -------------------------------------------------------------------------------


def test_max_models_refuses_a_heartbeat_that_would_exceed_it() -> None:
    registry = Registry(max_models=2)
    assert registry.observe(hb("w1", ("a", "b")), now=0.0) is Observation.ADDED
    assert registry.observe(hb("w2", ("c",)), now=0.0) is Observation.REFUSED
    assert "w2" not in registry
    # Known models are always welcome.
    assert registry.observe(hb("w3", ("b",)), now=0.0) is Observation.ADDED
    assert registry.model_names() == {"a", "b"}


def test_max_models_refuses_an_update_adding_a_model_and_keeps_the_old_state() -> None:
    registry = Registry(max_models=2)
    registry.observe(hb("w1", ("a", "b")), now=0.0)
    assert registry.observe(hb("w1", ("a", "b", "c"), seq=1), now=1.0) is Observation.REFUSED
    info = registry.get("w1")
    assert info is not None
    assert info.models == ("a", "b")
    assert info.last_heartbeat == 0.0
    # Dropping a model and adding another stays within the cap.
    assert registry.observe(hb("w1", ("a", "c"), seq=2), now=2.0) is Observation.UPDATED
    assert registry.model_names() == {"a", "c"}


def test_max_models_frees_room_when_a_worker_leaves() -> None:
    registry = Registry(max_models=1)
    registry.observe(hb("w1", ("a",)), now=0.0)
    assert registry.observe(hb("w2", ("b",)), now=0.0) is Observation.REFUSED
    registry.observe(hb("w1", seq=1, state=WorkerState.STOPPING), now=1.0)
    assert registry.observe(hb("w2", ("b",)), now=1.0) is Observation.ADDED


def test_model_index_follows_joins_changes_and_departures() -> None:
    """model_names()/serves() come from an index kept with every change; it must match a
    recount of the workers at every step."""
    import itertools

    from modelfleet.messages import Heartbeat as _Heartbeat

    registry = Registry(max_models=100)
    seq = itertools.count(1)

    def beat(worker: str, models: tuple[str, ...], state: str = "ready") -> None:
        hb = _Heartbeat(
            worker_id=worker, models=models, concurrency=1, state=state,  # type: ignore[arg-type]
            sent_at=0.0, interval_s=1.0, seq=next(seq),
        )  # fmt: skip
        registry.observe(hb, now=float(next(seq)))

    def recount() -> set[str]:
        return {m for w in registry.workers() for m in w.models}

    beat("a", ("x", "y"))
    beat("b", ("y",))
    assert registry.model_names() == recount() == {"x", "y"}
    beat("a", ("z",))  # a worker's models change
    assert registry.model_names() == recount() == {"y", "z"}
    beat("b", ("y",), state="stopping")
    assert registry.model_names() == recount() == {"z"} and not registry.serves("y")
    registry.sweep(now=10_000.0, timeout_s=1.0, guard_min_workers=99)
    assert registry.model_names() == recount() == set()


def test_guard_sees_a_staggered_fleet_wide_silence_before_anyone_is_evicted() -> None:
    """Heartbeats run at different phases: when the broker stops them all at t=10, workers pass
    the timeout one sweep after another. Seen one at a time, 2 of 4 silent is not "most"; the
    guard must count the whole fleet gone quiet and evict nobody."""
    registry = Registry()
    for worker_id, last in (("a", 9.0), ("b", 9.5), ("c", 9.8), ("d", 9.9)):
        registry.observe(hb(worker_id), now=last)
    # t=15.6: a and b are past the 6 s timeout; c and d are not yet, but quiet for > 3 s.
    result = registry.sweep(now=15.6, timeout_s=6.0, guard_ratio=0.5, guard_min_workers=3)
    assert result.suspect_broker and result.evicted == ()
    assert len(registry) == 4


def test_one_silent_worker_among_talking_ones_is_evicted() -> None:
    registry = Registry()
    for worker_id, last in (("a", 1.0), ("b", 9.5), ("c", 9.8), ("d", 9.9)):
        registry.observe(hb(worker_id), now=last)
    result = registry.sweep(now=10.0, timeout_s=6.0, guard_ratio=0.5, guard_min_workers=3)
    assert not result.suspect_broker
    assert [w.worker_id for w in result.evicted] == ["a"]
