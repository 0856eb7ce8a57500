"""The models cap counts every model the controller remembers, not only the live ones."""

from __future__ import annotations

import time

from modelfleet.config import settings_from_mapping
from modelfleet.controller import Controller
from modelfleet.messages import Heartbeat
from modelfleet.registry import Observation


def _beat(worker: str, models: tuple[str, ...], *, state: str = "ready", seq: int = 1) -> bytes:
    hb = Heartbeat(
        worker_id=worker,
        models=models,
        concurrency=1,
        state=state,  # type: ignore[arg-type]
        sent_at=time.time(),
        interval_s=1.0,
        seq=seq,
    )
    return hb.model_dump_json().encode()


def test_rotating_model_names_cannot_grow_past_the_cap() -> None:
    controller = Controller(settings_from_mapping({"routing": {"max_models": 3}}))
    assert controller.handle_heartbeat(_beat("w1", ("a", "b", "c"))) is Observation.ADDED
    controller.routing.plan(now=0.0, live=controller.registry.live_models(), listen_only=False)
    for model in ("a", "b", "c"):
        controller.routing.mark_bound(model)
    assert controller.handle_heartbeat(_beat("w1", ("a", "b", "c"), state="stopping", seq=2)) is (
        Observation.REMOVED
    )
    # Still bound (inside the no-worker grace): remembered, so new names are refused.
    assert controller.handle_heartbeat(_beat("w2", ("d",))) is Observation.REFUSED
    # Once unbound they can make room, the longest unbound first.
    for i, model in enumerate(("a", "b", "c")):
        controller.routing.mark_unbound(model, now=float(i))
    assert controller.handle_heartbeat(_beat("w2", ("d", "e"))) is Observation.ADDED
    assert controller.routing.known() == {"c"}
    assert controller.registry.model_names() == {"d", "e"}
    assert controller.handle_heartbeat(_beat("w3", ("f", "g"))) is Observation.REFUSED
    remembered = controller.routing.known() | controller.registry.model_names()
    assert len(remembered) <= 3
