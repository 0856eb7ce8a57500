"""Property-based: no heartbeat body, however broken or hostile, makes the controller raise.

Pure (no broker): a ``Controller`` is built and never started, and ``handle_heartbeat`` is fed
arbitrary bytes, arbitrary JSON, heartbeat-shaped dicts with wrong types, hostile numbers
(negative, NaN/Infinity literals, 10**400), timestamps far in the future or past, huge strings,
thousands of models and deeply nested JSON. After every body:

* it did not raise, and an unstarted controller scheduled nothing (``_kick`` is a no-op);
* a drop is counted once in ``modelfleet_heartbeats_invalid_total`` with a cause from a small
  fixed set, and a heartbeat that was not dropped is counted as received instead;
* the registry never holds more than ``routing.max_models`` distinct models;
* liveness uses the controller's clock, whatever ``sent_at`` says, and the lag histogram never
  gets a negative or absurd observation;
* the fleet's job counters only go up, and ``/metrics`` and the status API still render.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from prometheus_client import Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from modelfleet.config import settings_from_mapping
from modelfleet.controller import Controller
from modelfleet.metrics import HEARTBEAT_INVALID_CAUSES
from modelfleet.registry import Observation
from tests.fuzz.strategies import (
    deep_bodies,
    dumps,
    heartbeat_shaped,
    huge_strings,
    json_values,
    many_models,
    nested,
    valid_heartbeat,
)

# "user" (a sender not in security.heartbeat_users) is checked before handle_heartbeat.
# Every cause the controller may count: a small fixed set (exported at 0 from the start).
CAUSES = frozenset({"too_large", "not_json", "version", "schema", "models_cap", "user", "clock"})
assert frozenset(HEARTBEAT_INVALID_CAUSES) == CAUSES
MAX_MODELS = 6
# A heartbeat waits at most heartbeat.queue_ttl_s in the controller's queue; anything near an
# hour is a skewed clock, not a lag, and must not reach the histogram.
LAG_BOUND_S = 3600.0
FUZZ = settings(
    max_examples=150,
    deadline=None,
    # No "explain" phase: its line tracer makes a failing case take minutes on Python 3.11.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _totals(metric: Counter | Histogram) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in metric.collect()
        for sample in family.samples
    }


class Probe:
    """An unstarted controller on a fake monotonic clock, and the checks run after each body."""

    def __init__(self) -> None:
        self.now = 5_000.0
        self.settings = settings_from_mapping({"routing": {"max_models": MAX_MODELS}})
        self.controller = Controller(self.settings, instance="fuzz", clock=lambda: self.now)

    def fleet_totals(self) -> dict[tuple[str, str, int], float]:
        out: dict[tuple[str, str, int], float] = {}
        for model, totals in self.controller.fleet_stats.models.items():
            for outcome, count in totals.jobs.items():
                out[(model, f"jobs.{outcome}", 0)] = count
            for name in ("duration", "queue_wait", "first_chunk"):
                histogram = getattr(totals, name)
                for i, count in enumerate(histogram.counts):
                    out[(model, name, i)] = count
                out[(model, f"{name}.sum", 0)] = histogram.sum
        return out

    def feed(self, body: bytes) -> Observation | None:
        c = self.controller
        invalid_before = _totals(c.metrics.heartbeats_invalid)
        received_before = _totals(c.metrics.heartbeats)
        lag_before = _totals(c.metrics.heartbeat_lag)
        fleet_before = self.fleet_totals()
        self.now += 0.01

        result = c.handle_heartbeat(body)  # must never raise

        invalid = {
            key: value - invalid_before.get(key, 0.0)
            for key, value in _totals(c.metrics.heartbeats_invalid).items()
            if value != invalid_before.get(key, 0.0)
        }
        received = sum(_totals(c.metrics.heartbeats).values()) - sum(received_before.values())
        if result is None or result is Observation.REFUSED:
            [(key, delta)] = invalid.items()  # exactly one cause counted, once
            assert delta == 1
            cause = dict(key[1])["cause"]
            assert cause in CAUSES
            if result is Observation.REFUSED:
                assert cause == "models_cap"
            assert received == 0
        else:
            assert invalid == {}
            assert received == 1

        # Bounded registry, nothing scheduled by an unstarted controller.
        assert len(c.registry.model_names()) <= MAX_MODELS
        assert c._tasks == []
        assert not c._kick_pending

        # Liveness is the controller's own clock, never the worker's sent_at.
        if result in (Observation.ADDED, Observation.UPDATED):
            worker_id = json.loads(body)["worker_id"]
            info = c.registry.get(worker_id)
            assert info is not None
            assert info.last_heartbeat == self.now
            timeout = self.settings.heartbeat.timeout_s
            silent = c.registry.silent(now=self.now + timeout + 0.001, timeout_s=timeout)
            assert worker_id in {w.worker_id for w in silent}

        # The lag histogram: at most one observation, never negative, never absurd.
        lag = _totals(c.metrics.heartbeat_lag)
        count_key = ("modelfleet_heartbeat_lag_seconds_count", ())
        sum_key = ("modelfleet_heartbeat_lag_seconds_sum", ())
        assert lag[count_key] - lag_before[count_key] in (0.0, 1.0)
        assert 0.0 <= lag[sum_key] - lag_before[sum_key] <= LAG_BOUND_S

        # Fleet job counters are Prometheus counters: they only ever go up.
        fleet_after = self.fleet_totals()
        for key, before in fleet_before.items():
            assert fleet_after[key] >= before, key
        return result

    def check_outputs(self) -> None:
        c = self.controller
        text = c.metrics.render().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        causes = {s.labels["cause"] for s in families["modelfleet_heartbeats_invalid"].samples}
        assert causes <= CAUSES
        models = {s.labels["model"] for s in families["modelfleet_model_workers"].samples}
        assert len(models) <= MAX_MODELS
        json.dumps(c.workers_status())
        json.dumps(c.models_status())


def feed_all(bodies: list[bytes]) -> Probe:
    probe = Probe()
    for body in bodies:
        probe.feed(body)
    probe.check_outputs()
    return probe


# -- the properties ----------------------------------------------------------------------------


@FUZZ
@given(st.lists(st.binary(max_size=2_000), min_size=1, max_size=5))
@example([b"", b"\x00", b"\xff\xfe", b"{", b"null", b"[]", b"NaN", b"1e999"])
def test_arbitrary_bytes(bodies: list[bytes]) -> None:
    feed_all(bodies)


@FUZZ
@given(st.lists(json_values, min_size=1, max_size=5))
def test_arbitrary_json_values(values: list[Any]) -> None:
    feed_all([dumps(v) for v in values])


@settings(FUZZ, max_examples=250)
@given(st.lists(heartbeat_shaped(), min_size=1, max_size=10))
def test_heartbeat_shaped_dicts_with_wrong_types(heartbeats: list[dict[str, Any]]) -> None:
    feed_all([dumps(hb) for hb in heartbeats])


@settings(FUZZ, max_examples=40)
@given(
    st.one_of(
        huge_strings.map(lambda s: dumps(valid_heartbeat(worker_id=s))),
        huge_strings.map(lambda s: dumps({**valid_heartbeat(), "host": s})),
        huge_strings.map(lambda s: dumps(valid_heartbeat(models=[s]))),
        many_models.map(lambda models: dumps(valid_heartbeat(models=models or ["m-0"]))),
        deep_bodies,
        st.integers(1, 2_000).map(lambda d: dumps({**valid_heartbeat(), "stats": [[]] * d})),
    )
)
@example(dumps(valid_heartbeat(models=[f"m-{i}" for i in range(5_000)])))
@example(dumps(valid_heartbeat(models=[f"m-{i}" for i in range(64)])))
@example(dumps({**valid_heartbeat(), "host": "x" * 1_000_000}))
@example(nested(30_000))
@example(b"[" * 60_000)
def test_huge_strings_thousands_of_models_and_deep_nesting(body: bytes) -> None:
    feed_all([body])


def test_timestamps_far_in_the_future_or_past_never_skew_liveness_or_lag() -> None:
    probe = Probe()
    for i, sent_at in enumerate([1e12, -1e300, 0.0, 1e308, -1e308]):
        body = dumps({**valid_heartbeat(worker_id=f"w-{i}"), "sent_at": sent_at})
        assert probe.feed(body) is Observation.ADDED
    probe.check_outputs()


def test_each_drop_has_its_documented_cause() -> None:
    probe = Probe()
    causes = {
        "not_json": b"\xff not json",
        "schema": dumps({**valid_heartbeat(), "concurrency": "lots"}),
        "version": dumps({**valid_heartbeat(), "v": 2}),
        "too_large": dumps({**valid_heartbeat(), "host": "x" * 70_000}),
        "models_cap": dumps(valid_heartbeat(models=[f"m-{i}" for i in range(MAX_MODELS + 1)])),
    }
    for cause, body in causes.items():
        probe.feed(body)
        value = probe.controller.metrics.registry.get_sample_value(
            "modelfleet_heartbeats_invalid_total", {"cause": cause}
        )
        assert value == 1, cause


def test_an_unstarted_controller_does_not_schedule_routing() -> None:
    probe = Probe()
    # No event loop runs here: scheduling a routing round would raise RuntimeError.
    probe.controller._kick()
    assert probe.feed(dumps(valid_heartbeat())) is Observation.ADDED
    assert probe.feed(dumps({**valid_heartbeat(), "state": "stopping"})) is Observation.REMOVED
    assert probe.controller._tasks == []
