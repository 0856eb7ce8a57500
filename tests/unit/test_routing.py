"""Routing decisions: bind while a model has live workers, unbind after a grace. Pure."""

from __future__ import annotations

from modelfleet.routing import Action, ActionKind, RoutingTable

GRACE = 3.0


def bind(model: str) -> Action:
    return Action(ActionKind.BIND, model)


def unbind(model: str) -> Action:
    return Action(ActionKind.UNBIND, model)


def bound_table(*models: str, now: float = 0.0) -> RoutingTable:
    table = RoutingTable(grace_s=GRACE, forget_after_s=600.0)
    actions = table.plan(now=now, live=set(models), listen_only=False)
    assert actions == [bind(m) for m in sorted(models)]
    for model in models:
        table.mark_bound(model)
    return table


def test_live_model_is_bound_once() -> None:
    table = RoutingTable(grace_s=GRACE)
    assert table.plan(now=0.0, live={"llama"}, listen_only=False) == [bind("llama")]
    assert not table.routable("llama")
    table.mark_bound("llama")
    assert table.routable("llama")
    assert table.plan(now=1.0, live={"llama"}, listen_only=False) == []


def test_failed_bind_is_planned_again() -> None:
    table = RoutingTable(grace_s=GRACE)
    assert table.plan(now=0.0, live={"llama"}, listen_only=False) == [bind("llama")]
    assert table.plan(now=1.0, live={"llama"}, listen_only=False) == [bind("llama")]


def test_binding_happens_even_while_listening_only() -> None:
    table = RoutingTable(grace_s=GRACE)
    assert table.plan(now=0.0, live={"b", "a"}, listen_only=True) == [bind("a"), bind("b")]


def test_no_unbind_while_listening_only() -> None:
    table = bound_table("llama")
    assert table.plan(now=1.0, live=set(), listen_only=True) == []
    assert table.plan(now=100.0, live=set(), listen_only=True) == []
    assert table.routable("llama")
    # Once the window ends the model has been workerless long enough.
    assert table.plan(now=101.0, live=set(), listen_only=False) == [unbind("llama")]


def test_no_unbind_before_the_grace() -> None:
    table = bound_table("llama")
    assert table.plan(now=10.0, live=set(), listen_only=False) == []
    assert table.plan(now=10.0 + GRACE - 0.01, live=set(), listen_only=False) == []
    assert table.routable("llama")


def test_unbind_after_the_grace() -> None:
    table = bound_table("llama", "mistral")
    table.plan(now=10.0, live={"mistral"}, listen_only=False)
    assert table.plan(now=10.0 + GRACE, live={"mistral"}, listen_only=False) == [unbind("llama")]


def test_failed_unbind_is_planned_again_and_done_one_is_not() -> None:
    table = bound_table("llama")
    table.plan(now=10.0, live=set(), listen_only=False)
    assert table.plan(now=13.0, live=set(), listen_only=False) == [unbind("llama")]
    assert table.plan(now=14.0, live=set(), listen_only=False) == [unbind("llama")]
    table.mark_unbound("llama", now=14.0)
    assert not table.routable("llama")
    assert table.plan(now=15.0, live=set(), listen_only=False) == []
    assert table.plan(now=500.0, live=set(), listen_only=False) == []


def test_restart_within_the_grace_keeps_the_binding_and_resets_the_clock() -> None:
    table = bound_table("llama")
    table.plan(now=10.0, live=set(), listen_only=False)
    assert table.plan(now=12.0, live={"llama"}, listen_only=False) == []  # back, still bound
    route = table.route("llama")
    assert route is not None and route.empty_since is None
    # It goes again: a fresh grace from now on, not from 10.0.
    assert table.plan(now=20.0, live=set(), listen_only=False) == []
    assert table.plan(now=22.9, live=set(), listen_only=False) == []
    assert table.plan(now=23.0, live=set(), listen_only=False) == [unbind("llama")]


def test_returning_worker_rebinds() -> None:
    table = bound_table("llama")
    table.plan(now=10.0, live=set(), listen_only=False)
    table.plan(now=13.0, live=set(), listen_only=False)
    table.mark_unbound("llama", now=13.0)
    assert table.plan(now=30.0, live={"llama"}, listen_only=False) == [bind("llama")]
    route = table.route("llama")
    assert route is not None
    assert route.empty_since is None
    assert route.unbound_at is None
    table.mark_bound("llama")
    assert table.routable("llama")


def test_learned_model_is_unbound_after_the_grace_when_no_worker_appears() -> None:
    table = RoutingTable(grace_s=GRACE)
    table.learn({"mistral"}, now=0.0)
    assert "mistral" in table
    assert table.known() == {"mistral"}
    assert not table.routable("mistral")
    assert table.plan(now=2.0, live=set(), listen_only=False) == []
    assert table.plan(now=GRACE, live=set(), listen_only=False) == [unbind("mistral")]


def test_learned_model_with_a_worker_is_bound() -> None:
    table = RoutingTable(grace_s=GRACE)
    table.learn(["mistral"], now=0.0)
    assert table.plan(now=10.0, live={"mistral"}, listen_only=False) == [bind("mistral")]


def test_learn_does_not_reset_a_known_model() -> None:
    table = bound_table("llama")
    table.learn({"llama"}, now=50.0)
    assert table.routable("llama")
    route = table.route("llama")
    assert route is not None and route.empty_since is None


def test_unrouted_lists_unbound_models_without_workers() -> None:
    table = bound_table("a", "b", "c")
    table.mark_unbound("b", now=5.0)
    table.mark_unbound("a", now=5.0)
    assert table.unrouted(live={"c"}) == ["a", "b"]
    # A worker for "b" appeared but the bind has not happened yet: not drained.
    assert table.unrouted(live={"b", "c"}) == ["a"]
    assert table.unrouted(live={"a", "b", "c"}) == []


def test_forget_stale_drops_long_unbound_models_only() -> None:
    table = RoutingTable(grace_s=GRACE, forget_after_s=600.0)
    for model in ("gone", "bound", "back"):
        table.mark_bound(model)
    table.mark_unbound("gone", now=100.0)
    table.mark_unbound("back", now=100.0)
    assert table.forget_stale(now=699.0, live=set()) == []
    assert table.forget_stale(now=700.0, live={"back"}) == ["gone"]
    assert "gone" not in table
    assert table.known() == {"bound", "back"}
    assert table.route("gone") is None


def test_forget_oldest_unrouted_makes_room_longest_unbound_first() -> None:
    table = RoutingTable(grace_s=0.0)
    for i, model in enumerate(["a", "b", "c"]):
        table.mark_bound(model)
        table.mark_unbound(model, now=float(i))
    table.mark_bound("live")
    assert table.forget_oldest_unrouted(2, keep={"a"}) == ["b", "c"]
    assert table.known() == {"a", "live"}
    assert table.forget_oldest_unrouted(5, keep=set()) == ["a"]  # a bound model is never dropped
    assert table.known() == {"live"}


def test_unbound_is_true_only_for_models_this_controller_unbound() -> None:
    table = RoutingTable(grace_s=1.0)
    assert not table.unbound("llama")  # unknown
    table.learn(["llama"], now=0.0)
    assert not table.unbound("llama")  # known from the catalog, binding state unknown
    table.mark_bound("llama")
    assert not table.unbound("llama")
    table.mark_unbound("llama", now=5.0)
    assert table.unbound("llama")
