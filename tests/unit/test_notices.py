"""A controller's refusal notices: their wire form and how often a worker hears one (pure)."""

from __future__ import annotations

import json

from modelfleet.notices import Notices, Refusal, parse_refusal, refusal_body


def test_a_refusal_survives_the_wire_and_nothing_else_parses_as_one() -> None:
    refusal = Refusal("w1", "models_cap", "worker w1 would exceed routing.max_models")
    assert parse_refusal(refusal_body(refusal)) == refusal
    assert parse_refusal(b'{"cancel": "abc", "key": "k"}') is None
    assert parse_refusal(b"not json") is None
    assert parse_refusal(json.dumps({"notice": "refused", "worker_id": "w1"}).encode()) is None
    assert parse_refusal(b"x" * 10_000) is None
    long = parse_refusal(refusal_body(Refusal("w" * 300, "c" * 100, "m" * 2000)))
    assert long is not None and len(long.worker_id) == 256 and len(long.message) == 1000


def test_a_worker_hears_a_refusal_at_most_once_per_period() -> None:
    notices = Notices(every_s=30)
    first = Refusal("w1", "user", "heartbeat from user 'x'")
    notices.refuse(first, now=0)
    notices.refuse(Refusal("w2", "clock", "ahead"), now=0)
    assert sorted(r.worker_id for r in notices.take(now=0)) == ["w1", "w2"]
    notices.refuse(first, now=10)  # heard 10 s ago: not again yet
    assert notices.take(now=10) == []
    notices.refuse(first, now=31)
    assert notices.take(now=31) == [first]
