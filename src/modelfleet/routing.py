"""Routing decisions: which model queues should be bound to the jobs exchange. Pure, no I/O.

A model is *routable* while it has a live worker. When its last worker goes, the model gets a grace
period (``routing.no_worker_grace_s``) for a restart; then its queue is unbound — new jobs fall
through to the unroutable queue and fail at once with NO_WORKER — and its backlog is drained with
NO_WORKER replies. Binding is always safe; unbinding is not, so nothing is unbound during the
controller's start-up listen window, when the registry is still filling.

The controller runs :meth:`RoutingTable.plan`, executes the actions, and reports each success
back (:meth:`RoutingTable.mark_bound` / :meth:`RoutingTable.mark_unbound`); a failed action is
simply planned again on the next round. Several controllers converge: every action is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Action", "ActionKind", "ModelRoute", "RoutingTable"]


class ActionKind(StrEnum):
    BIND = "bind"
    UNBIND = "unbind"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    model: str


@dataclass
class ModelRoute:
    # True/False once this controller bound/unbound it; None = not known yet (after start).
    bound: bool | None = None
    # Monotonic time the model was last seen without a live worker; None while it has one.
    empty_since: float | None = None
    # Monotonic time it was unbound (for forgetting long-dead models).
    unbound_at: float | None = None


class RoutingTable:
    """Per-model routing state with an injected clock.

    >>> table = RoutingTable(grace_s=3.0, forget_after_s=600.0)
    >>> table.plan(now=10.0, live={"llama"}, listen_only=False)
    [Action(kind=<ActionKind.BIND: 'bind'>, model='llama')]
    """

    def __init__(self, *, grace_s: float, forget_after_s: float = 600.0) -> None:
        self.grace_s = grace_s
        self.forget_after_s = forget_after_s
        self._routes: dict[str, ModelRoute] = {}

    def __contains__(self, model: object) -> bool:
        return model in self._routes

    def known(self) -> set[str]:
        return set(self._routes)

    def route(self, model: str) -> ModelRoute | None:
        return self._routes.get(model)

    def learn(self, models: set[str] | list[str], *, now: float) -> None:
        """Add models known from elsewhere (the catalog) with no live worker seen yet."""
        for model in models:
            self._routes.setdefault(model, ModelRoute(empty_since=now))

    def routable(self, model: str) -> bool:
        route = self._routes.get(model)
        return route is not None and route.bound is True

    def unbound(self, model: str) -> bool:
        """Whether this controller unbound ``model`` (its backlog is then drained)."""
        route = self._routes.get(model)
        return route is not None and route.bound is False

    def plan(self, *, now: float, live: set[str], listen_only: bool) -> list[Action]:
        actions: list[Action] = []
        for model in live:
            route = self._routes.setdefault(model, ModelRoute())
            route.empty_since = None
            route.unbound_at = None
            if route.bound is not True:
                actions.append(Action(ActionKind.BIND, model))
        for model, route in self._routes.items():
            if model in live:
                continue
            if route.empty_since is None:
                route.empty_since = now
            if listen_only or route.bound is False:
                continue
            if now - route.empty_since >= self.grace_s:
                actions.append(Action(ActionKind.UNBIND, model))
        return sorted(actions, key=lambda a: (a.kind, a.model))

    def mark_bound(self, model: str) -> None:
        self._routes.setdefault(model, ModelRoute()).bound = True

    def mark_unbound(self, model: str, *, now: float) -> None:
        route = self._routes.setdefault(model, ModelRoute(empty_since=now))
        route.bound = False
        route.unbound_at = now

    def unrouted(self, live: set[str]) -> list[str]:
        """Unbound models without a live worker: their queues are drained with NO_WORKER."""
        return sorted(m for m, r in self._routes.items() if r.bound is False and m not in live)

    def forget_oldest_unrouted(self, count: int, *, keep: set[str]) -> list[str]:
        """Forget up to ``count`` unbound models not in ``keep``, longest unbound first (to make
        room under the models cap); returns the forgotten."""
        candidates = sorted(
            (r.unbound_at or 0.0, m)
            for m, r in self._routes.items()
            if r.bound is False and m not in keep
        )
        forgotten = [m for _, m in candidates[:count]]
        for model in forgotten:
            del self._routes[model]
        return forgotten

    def forget_stale(self, *, now: float, live: set[str]) -> list[str]:
        """Drop models unbound and workerless for ``forget_after_s``; returns the dropped."""
        stale = [
            m
            for m, r in self._routes.items()
            if m not in live
            and r.bound is False
            and r.unbound_at is not None
            and now - r.unbound_at >= self.forget_after_s
        ]
        for model in stale:
            del self._routes[model]
        return stale
