"""Hypothesis strategies for hostile input: arbitrary JSON, hostile numbers, heartbeat- and
job-shaped dicts with wrong types, huge strings, deep nesting."""

from __future__ import annotations

import json
import time
from typing import Any

from hypothesis import strategies as st

from modelfleet.stats import DURATION_BUCKETS

# Numbers a hostile or broken peer may send. json.dumps writes NaN/Infinity as the (non-standard)
# literals NaN, Infinity and -Infinity, which is exactly what such a peer would put on the wire.
HOSTILE_NUMBERS: list[Any] = [
    0,
    -1,
    -(2**63),
    2**63,
    2**64 + 1,
    10**400,
    -(10**400),
    float("nan"),
    float("inf"),
    float("-inf"),
    -0.0,
    1e-320,
    1e308,
    -1e308,
    1e12,
    -1e300,
    True,
    False,
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN and infinities included
    st.sampled_from(HOSTILE_NUMBERS),
    st.text(max_size=30),
)

json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=30,
)


def dumps(value: Any) -> bytes:
    """JSON with NaN/Infinity literals allowed (what a broken peer may send)."""
    return json.dumps(value, allow_nan=True).encode()


def nested(depth: int) -> bytes:
    """Deeply nested JSON: lists inside dicts inside lists..."""
    return ('{"a":[' * depth + "1" + "]}" * depth).encode()


huge_strings = st.integers(0, 120_000).map(lambda n: "x" * n)
deep_bodies = st.integers(1, 30_000).map(nested)


def valid_heartbeat(worker_id: str = "w-1", models: list[str] | None = None) -> dict[str, Any]:
    return {
        "v": 1,
        "worker_id": worker_id,
        "models": models or ["m-1"],
        "concurrency": 2,
        "in_flight": 0,
        "sent_at": time.time(),
        "interval_s": 0.25,
        "seq": 1,
    }


HEARTBEAT_FIELDS = [
    "v",
    "worker_id",
    "models",
    "concurrency",
    "in_flight",
    "oldest_job_age_s",
    "stuck_jobs",
    "state",
    "speed",
    "host",
    "pid",
    "version",
    "sent_at",
    "interval_s",
    "seq",
    "counters",
    "stats",
    "stop_reason",
]

hostile_values = st.one_of(
    json_values,
    st.sampled_from(HOSTILE_NUMBERS),
    huge_strings,
    st.integers(1, 40).map(lambda d: json.loads(nested(d))),
)

model_names = st.sampled_from([f"m-{i}" for i in range(12)])


def stats_for(models: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Per-model job statistics with hostile counts (negative, huge, wrong length)."""
    counts = st.one_of(
        st.integers(),
        st.sampled_from([-1, 2**53, 2**63, 10**300, 10**400]),
    )
    histogram = st.fixed_dictionaries(
        {
            "counts": st.one_of(
                st.lists(counts, min_size=len(DURATION_BUCKETS) + 1, max_size=17),
                st.lists(counts, max_size=20),
            ),
            "sum": st.one_of(st.floats(), st.sampled_from(HOSTILE_NUMBERS)),
        }
    )
    one = st.fixed_dictionaries(
        {},
        optional={
            "jobs": st.dictionaries(
                st.sampled_from(["ok", "worker_error", "invalid", "timeout", "bogus"]),
                counts,
                max_size=4,
            ),
            "duration": histogram,
            "queue_wait": histogram,
            "first_chunk": histogram,
        },
    )
    return st.dictionaries(st.sampled_from(models), one, max_size=len(models))


@st.composite
def heartbeat_shaped(draw: st.DrawFn) -> dict[str, Any]:
    """A heartbeat with some fields replaced by hostile values (or a plausible valid one)."""
    worker_id = draw(st.sampled_from(["w-1", "w-2", "w-3", "w-4"]))
    models = draw(st.lists(model_names, min_size=1, max_size=5, unique=True))
    body = valid_heartbeat(worker_id, models)
    body["seq"] = draw(st.integers(0, 50))
    body["state"] = draw(st.sampled_from(["ready", "ready", "ready", "draining", "stopping"]))
    if draw(st.booleans()):
        body["stats"] = draw(stats_for(models))
    if draw(st.booleans()):
        body["sent_at"] = draw(
            st.one_of(
                st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e12, -1e300])
            )
        )
    for field in draw(st.lists(st.sampled_from(HEARTBEAT_FIELDS), max_size=3, unique=True)):
        if draw(st.booleans()):
            body[field] = draw(hostile_values)
        else:
            body.pop(field, None)
    return body


many_models = st.integers(0, 6_000).map(lambda n: [f"m-{i}" for i in range(n)])
