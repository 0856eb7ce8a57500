"""The registry: pure state fed by heartbeats, on an injected clock (plain floats)."""

from __future__ import annotations

from typing import Any

from modelfleet.messages import Heartbeat, WorkerState
from modelfleet.registry import (
    MAX_STARTED_AHEAD_S,
    RECONNECT_ALLOWANCE_TIMEOUTS,
    EvictionHold,
    ModelView,
    Observation,
    Registry,
    SweepResult,
    started_at_plausible,
)

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


# --- mass silence ends on its own: the controller's probe vouches for a real death ------------


def test_a_probe_back_after_the_deadline_vouches_for_silent_workers_under_mass_silence() -> None:
    """3 of 4 workers die at once with the broker healthy: once the controller's probe comes
    back later than a dead worker's deadline (last heartbeat + timeout), it is evicted."""
    registry = fleet("w1", "w2", "w3", "w4", now=0.0)
    registry.observe(hb("w4", seq=1), now=6.5)
    guard = {"timeout_s": TIMEOUT, "guard_ratio": 0.5, "guard_min_workers": 3}
    # Probe back at 5.9: before the deadline (6.0) of w1..w3, so nobody is vouched for yet.
    held = registry.sweep(now=6.6, vouched_at=5.9, **guard)  # type: ignore[arg-type]
    assert held.suspect_broker and held.evicted == ()
    assert held.held == ("w1", "w2", "w3")
    assert len(registry) == 4
    # Probe back at 6.2: later than every dead worker's deadline.
    result = registry.sweep(now=6.7, vouched_at=6.2, **guard)  # type: ignore[arg-type]
    assert [w.worker_id for w in result.evicted] == ["w1", "w2", "w3"]
    assert not result.suspect_broker and result.held == ()
    assert [w.worker_id for w in registry.workers()] == ["w4"]


def test_only_workers_whose_deadline_the_probe_passed_are_evicted_the_others_held() -> None:
    registry = Registry()
    for worker_id, last in (("a", 0.0), ("b", 1.0), ("c", 2.0), ("d", 9.0)):
        registry.observe(hb(worker_id), now=last)
    # Deadlines: a 6, b 7, c 8. The probe came back at 7.5: a and b are gone for sure.
    result = registry.sweep(now=8.5, timeout_s=TIMEOUT, vouched_at=7.5)
    assert [w.worker_id for w in result.evicted] == ["a", "b"]
    assert result.suspect_broker and result.held == ("c",)
    assert sorted(w.worker_id for w in registry.workers()) == ["c", "d"]


def test_a_probe_exactly_at_the_deadline_does_not_vouch() -> None:
    registry = fleet("w1", "w2", "w3", now=0.0)
    result = registry.sweep(now=7.0, timeout_s=TIMEOUT, vouched_at=TIMEOUT)
    assert result.suspect_broker and result.evicted == ()
    assert len(registry) == 3


def test_vouched_workers_are_only_reported_when_evict_is_false() -> None:
    registry = fleet("w1", "w2", "w3", now=0.0)
    result = registry.sweep(now=7.0, timeout_s=TIMEOUT, vouched_at=6.5, evict=False)
    assert result.evicted == () and not result.suspect_broker and result.held == ()
    assert len(registry) == 3


def test_without_a_probe_mass_silence_holds_as_before() -> None:
    registry = fleet("w1", "w2", "w3", now=0.0)
    result = registry.sweep(now=100.0, timeout_s=TIMEOUT, vouched_at=None)
    assert result.suspect_broker and result.held == ("w1", "w2", "w3")
    assert len(registry) == 3


# --- a restarted worker (same id, new started_at) ---------------------------------------------


def test_a_later_incarnation_replaces_the_entry_at_once_whatever_its_seq() -> None:
    registry = Registry()
    registry.observe(hb("w1", seq=500, started_at=1000.0, in_flight=3), now=10.0)
    result = registry.observe(hb("w1", seq=1, started_at=2000.0, in_flight=0), now=11.0)
    assert result is Observation.RESTARTED
    info = registry.get("w1")
    assert info is not None
    assert (info.seq, info.started_at, info.in_flight) == (1, 2000.0, 0)
    assert (info.first_seen, info.heartbeats) == (11.0, 1)
    # Its following heartbeats are ordinary updates.
    assert registry.observe(hb("w1", seq=2, started_at=2000.0), now=12.0) is Observation.UPDATED


def test_an_older_incarnation_is_ignored_even_with_a_higher_seq() -> None:
    registry = Registry()
    registry.observe(hb("w1", seq=1, started_at=2000.0, in_flight=0), now=10.0)
    late = hb("w1", seq=900, started_at=1000.0, in_flight=7)
    assert registry.observe(late, now=11.0) is Observation.IGNORED
    stopping = hb("w1", seq=901, started_at=1000.0, state=WorkerState.STOPPING)
    assert registry.observe(stopping, now=11.5) is Observation.IGNORED
    info = registry.get("w1")
    assert info is not None and (info.in_flight, info.started_at) == (0, 2000.0)


def test_a_restart_with_other_models_recounts_the_model_index() -> None:
    registry = Registry()
    registry.observe(hb("w1", ("a",), seq=9, started_at=1.0), now=0.0)
    registry.observe(hb("w1", ("b",), seq=1, started_at=2.0), now=1.0)
    assert registry.model_names() == {"b"}
    assert registry.serving("b") and not registry.serving("a")


# --- serving(model): an O(1) answer kept with every change -------------------------------------


def test_serving_follows_states_joins_and_departures() -> None:
    registry = Registry()

    def check() -> None:
        recount = {m for w in registry.workers() if w.serving for m in w.models}
        assert registry.live_models() == recount
        for model in ("a", "b", "c"):
            assert registry.serving(model) is (model in recount)

    registry.observe(hb("w1", ("a", "b"), seq=1), now=0.0)
    registry.observe(hb("w2", ("b",), seq=1), now=0.0)
    check()
    registry.observe(hb("w1", ("a", "b"), seq=2, state=WorkerState.DRAINING), now=1.0)
    check()
    assert not registry.serving("a") and registry.serving("b")
    registry.observe(hb("w1", ("a", "c"), seq=3), now=2.0)  # ready again, other models
    check()
    registry.observe(hb("w2", ("b",), seq=2, state=WorkerState.STOPPING), now=3.0)
    check()
    assert not registry.serving("b")
    registry.sweep(now=100.0, timeout_s=1.0, guard_min_workers=99)
    check()
    assert registry.live_models() == set()


# --- after broker trouble: when evictions may start again ---------------------------------------


def test_a_fresh_hold_allows_evictions() -> None:
    assert EvictionHold(TIMEOUT).allows(0.0)


def test_an_overdue_probe_holds_for_one_timeout_renewed_while_it_stays_overdue() -> None:
    hold = EvictionHold(TIMEOUT)
    hold.broker_silent(10.0)
    assert not hold.allows(10.0 + TIMEOUT - 0.01)
    hold.broker_silent(12.0)
    assert not hold.allows(10.0 + TIMEOUT + 1.0)
    assert hold.allows(12.0 + TIMEOUT)


def test_the_broker_back_gives_the_fleet_a_timeout_plus_the_reconnect_allowance() -> None:
    hold = EvictionHold(TIMEOUT)
    hold.broker_silent(10.0)
    hold.broker_back(11.0)
    back_until = 11.0 + TIMEOUT * (1 + RECONNECT_ALLOWANCE_TIMEOUTS)
    assert RECONNECT_ALLOWANCE_TIMEOUTS > 0  # more than the bare timeout
    assert not hold.allows(back_until - 0.01)
    assert hold.allows(back_until)


def test_a_hold_is_never_cut_short() -> None:
    hold = EvictionHold(TIMEOUT)
    hold.broker_back(20.0)
    hold.broker_silent(15.0)  # an older, shorter hold does not shorten it
    assert not hold.allows(20.0 + TIMEOUT)


def test_a_started_at_far_ahead_of_the_wall_clock_is_implausible() -> None:
    now = 1_700_000_000.0
    assert started_at_plausible(now - 3600, now)
    assert started_at_plausible(now + 5, now)  # ordinary clock skew between hosts
    assert started_at_plausible(now + MAX_STARTED_AHEAD_S, now)
    assert not started_at_plausible(now + MAX_STARTED_AHEAD_S + 1, now)
    assert not started_at_plausible(1e12, now)
