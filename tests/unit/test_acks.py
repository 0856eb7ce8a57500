"""plan_acks: which ack frames settle the finished deliveries without touching running ones."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from modelfleet.acks import plan_acks


def test_nothing_finished_sends_nothing() -> None:
    assert plan_acks([], [1, 2]) == (None, [])


def test_all_finished_is_one_multiple_ack() -> None:
    assert plan_acks([3, 1, 2], []) == (3, [])


def test_finished_above_a_running_one_are_acked_one_by_one() -> None:
    assert plan_acks([1, 2, 4, 6], [3, 5]) == (2, [4, 6])


def test_when_the_oldest_is_running_only_singles() -> None:
    assert plan_acks([5, 7], [1]) == (None, [5, 7])


def test_duplicates_are_acked_once() -> None:
    assert plan_acks([2, 2, 1], []) == (2, [])


@given(st.sets(st.integers(1, 200)), st.data())
def test_a_plan_settles_exactly_the_finished(tags: set[int], data: st.DataObject) -> None:
    finished = data.draw(st.sets(st.sampled_from(sorted(tags)))) if tags else set()
    running = tags - finished
    upto, singles = plan_acks(finished, running)
    covered = {t for t in tags if upto is not None and t <= upto} | set(singles)
    assert covered == finished  # every finished one, no running one
    assert len(singles) == len(set(singles))
    if finished:
        assert upto is not None or min(running, default=0) < min(finished)
