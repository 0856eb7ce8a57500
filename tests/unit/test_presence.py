"""When a job fails at once because nothing in its namespace can answer it (pure policy)."""

from __future__ import annotations

from modelfleet.presence import ControllerWatch, no_controller_text, unserved_worker_text
from modelfleet.topology import Names


def test_a_client_that_never_saw_a_controller_fails_at_the_first_miss() -> None:
    watch = ControllerWatch(remember_s=10)
    assert not watch.gone(0.0)  # nothing looked at yet
    watch.saw(0, now=100.0)
    assert watch.gone(100.0)
    watch.saw(None, now=100.5)  # the queue does not even exist
    assert watch.gone(100.5)


def test_a_controller_seen_before_is_given_time_to_come_back() -> None:
    watch = ControllerWatch(remember_s=10)
    watch.saw(1, now=0.0)
    assert not watch.gone(0.0)
    watch.saw(0, now=50.0)  # first miss (a restart, a broker restart)
    assert not watch.gone(50.0) and watch.absent_for(55.0) == 5.0
    watch.saw(0, now=59.0)
    assert not watch.gone(59.0)  # the absence counts from the first miss, not from this look
    assert watch.gone(60.5)
    watch.saw(2, now=61.0)  # back
    assert not watch.gone(61.0) and watch.absent_for(61.0) == 0.0


def test_the_messages_name_the_namespace_the_queues_and_the_fix() -> None:
    names = Names("prod")
    text = no_controller_text(names, "llama", unroutable_exists=True)
    assert "namespace 'prod'" in text and "'prod.unroutable'" in text
    assert "'prod.model.llama'" in text and "modelfleet controller" in text
    assert "does not exist" in no_controller_text(names, "llama", unroutable_exists=False)

    warning = unserved_worker_text(names, ["a", "b"], 6.2)
    assert "namespace 'prod'" in warning and "a, b" in warning and "6s" in warning
