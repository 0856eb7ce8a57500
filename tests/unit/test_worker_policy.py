"""The worker's pure policies: how a job that never started is republished, and when a worker
that lost a consumer subscribes again or gives up."""

from __future__ import annotations

from modelfleet.topology import DEADLINE_HEADER
from modelfleet.worker import IdleRecycle, ResubscribePolicy, handback_expiration, handback_headers

NOW = 1_700_000_000.0


def test_a_republished_job_expires_at_the_producers_deadline() -> None:
    headers = {DEADLINE_HEADER: int(NOW * 1000) + 2_500}
    assert handback_expiration(headers, 30.0, NOW) == 2.5


def test_a_deadline_already_passed_expires_at_once_not_never() -> None:
    headers = {DEADLINE_HEADER: int(NOW * 1000) - 10_000}
    assert handback_expiration(headers, 30.0, NOW) == 0.001


def test_without_a_deadline_the_original_expiration_is_kept() -> None:
    assert handback_expiration({}, 12.0, NOW) == 12.0
    assert handback_expiration(None, None, NOW) is None
    # A malformed deadline header is not a deadline.
    assert handback_expiration({DEADLINE_HEADER: "soon"}, None, NOW) is None
    assert handback_expiration({DEADLINE_HEADER: True}, 3.0, NOW) == 3.0


def test_a_republished_job_carries_no_delivery_count() -> None:
    headers = {"x-delivery-count": 2, DEADLINE_HEADER: 5, "x-death": [{"reason": "expired"}]}
    assert handback_headers(headers) == {DEADLINE_HEADER: 5, "x-death": [{"reason": "expired"}]}
    assert handback_headers(None) == {}


def test_a_consumer_present_needs_nothing() -> None:
    policy = ResubscribePolicy(grace_s=2, retry_s=0.5, max_retry_s=2, give_up_s=10)
    assert policy.observe("m", True, 0.0) == ResubscribePolicy.WAIT
    assert policy.missing == frozenset()


def test_a_lost_consumer_is_left_to_aio_pika_for_the_grace_then_retried_with_backoff() -> None:
    policy = ResubscribePolicy(grace_s=2, retry_s=0.5, max_retry_s=2, give_up_s=100)
    assert policy.observe("m", False, 10.0) == ResubscribePolicy.WAIT
    assert policy.missing == frozenset({"m"})
    assert policy.observe("m", False, 11.9) == ResubscribePolicy.WAIT
    retries = [
        t
        for t in (12.0, 12.2, 12.5, 12.9, 13.5, 14.0, 15.5, 17.5, 19.5)
        if policy.observe("m", False, t) == ResubscribePolicy.RETRY
    ]
    # At the end of the grace, then after 0.5, 1, 2 and 2 s (capped).
    assert retries == [12.0, 12.5, 13.5, 15.5, 17.5, 19.5]


def test_a_consumer_back_resets_the_watch() -> None:
    policy = ResubscribePolicy(grace_s=1, retry_s=1, max_retry_s=1, give_up_s=5)
    policy.observe("m", False, 0.0)
    assert policy.observe("m", True, 4.0) == ResubscribePolicy.WAIT
    assert policy.missing == frozenset()
    # Lost again later: a fresh grace, and the give-up clock starts again.
    assert policy.observe("m", False, 100.0) == ResubscribePolicy.WAIT
    assert policy.observe("m", False, 104.0) == ResubscribePolicy.RETRY


def test_a_worker_gives_up_after_give_up_s_without_a_consumer() -> None:
    policy = ResubscribePolicy(grace_s=1, retry_s=1, max_retry_s=1, give_up_s=5)
    policy.observe("m", False, 0.0)
    assert policy.observe("m", False, 4.9) != ResubscribePolicy.GIVE_UP
    assert policy.observe("m", False, 5.0) == ResubscribePolicy.GIVE_UP


def test_models_are_watched_apart_and_forget_stops_the_watch() -> None:
    policy = ResubscribePolicy(grace_s=1, retry_s=1, max_retry_s=1, give_up_s=5)
    policy.observe("a", False, 0.0)
    policy.observe("b", True, 0.0)
    assert policy.missing == frozenset({"a"})
    policy.forget("a")  # paused: no consumer is expected
    assert policy.missing == frozenset()
    assert policy.observe("a", False, 50.0) == ResubscribePolicy.WAIT  # a new grace


# -- IdleRecycle: when a quiet model queue's channel is renewed (phantom consumers) -------------


def test_a_quiet_channel_is_renewed_after_the_wait_and_the_wait_doubles() -> None:
    idle = IdleRecycle(after_s=1.0, max_after_s=3.0)
    assert not idle.observe("m", delivered=False, unsettled=0, now=0.0)
    assert not idle.observe("m", delivered=False, unsettled=0, now=0.9)
    assert idle.observe("m", delivered=False, unsettled=0, now=1.0)
    # Still quiet after a renewal: 2 s, then at most 3 s (max_after_s).
    assert not idle.observe("m", delivered=False, unsettled=0, now=2.9)
    assert idle.observe("m", delivered=False, unsettled=0, now=3.0)
    assert not idle.observe("m", delivered=False, unsettled=0, now=5.9)
    assert idle.observe("m", delivered=False, unsettled=0, now=6.0)
    assert idle.observe("m", delivered=False, unsettled=0, now=9.0)


def test_a_delivery_resets_the_wait() -> None:
    idle = IdleRecycle(after_s=1.0, max_after_s=8.0)
    idle.observe("m", delivered=False, unsettled=0, now=0.0)
    assert idle.observe("m", delivered=False, unsettled=0, now=1.0)  # next wait: 2 s
    assert not idle.observe("m", delivered=True, unsettled=0, now=1.5)
    assert not idle.observe("m", delivered=False, unsettled=0, now=2.4)
    assert idle.observe("m", delivered=False, unsettled=0, now=2.5)  # 1 s again


def test_a_channel_with_unsettled_jobs_is_never_renewed() -> None:
    idle = IdleRecycle(after_s=1.0, max_after_s=8.0)
    idle.observe("m", delivered=False, unsettled=0, now=0.0)
    assert not idle.observe("m", delivered=False, unsettled=2, now=5.0)
    # Its jobs settled: quiet counts from the last look that had some.
    assert not idle.observe("m", delivered=False, unsettled=0, now=5.5)
    assert idle.observe("m", delivered=False, unsettled=0, now=6.0)


def test_models_are_renewed_apart_and_forget_restarts_the_count() -> None:
    idle = IdleRecycle(after_s=1.0, max_after_s=8.0)
    idle.observe("a", delivered=False, unsettled=0, now=0.0)
    idle.observe("b", delivered=False, unsettled=0, now=0.5)
    assert idle.observe("a", delivered=False, unsettled=0, now=1.0)
    assert not idle.observe("b", delivered=False, unsettled=0, now=1.0)
    idle.forget("b")
    assert not idle.observe("b", delivered=False, unsettled=0, now=1.5)
    assert idle.observe("b", delivered=False, unsettled=0, now=2.5)
