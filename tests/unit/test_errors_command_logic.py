"""The pure decisions behind ``modelfleet errors``: job id prefixes, the order of a listing,
when a job died, which RabbitMQ versions warrant the delivery-limit warning, and the one failure
a replay ends with. No broker."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from modelfleet.errors_admin import (
    MAX_JSON_DEPTH,
    MIN_PREFIX,
    counts_returns_towards_limit,
    death_time,
    escape_control,
    json_depth,
    match_job_ids,
    order_by_age,
    parse_body,
    parse_version,
    replay_failure,
    replay_headers,
    returns_warning,
)

A = "9f0c2b7e61a34f4c9d7d2f3a8e1b0c55"
B = "9f0c2b7e61a3ffffffffffffffffffff"  # shares 12 characters with A
C = "1d2e3f405162738495a6b7c8d9e0f1a2"
KNOWN = [A, B, C, C]  # C twice: two copies of one job


# --- job id prefixes ----------------------------------------------------------------------------


def test_a_unique_prefix_names_its_job() -> None:
    match = match_job_ids(["1d2e3f", "9f0c2b7e61a34"], KNOWN)
    assert match.ok
    assert dict(match.resolved) == {"1d2e3f": C, "9f0c2b7e61a34": A}


def test_copies_of_one_job_are_one_match() -> None:
    assert dict(match_job_ids([C[:8]], KNOWN).resolved) == {C[:8]: C}


def test_an_ambiguous_prefix_lists_every_candidate() -> None:
    match = match_job_ids(["9f0c2b"], KNOWN)
    assert not match.ok
    assert dict(match.ambiguous) == {"9f0c2b": (A, B)}
    assert match.error == "USAGE"


def test_a_prefix_of_nothing_is_not_found() -> None:
    match = match_job_ids(["abcdef", C], KNOWN)
    assert match.missing == ("abcdef",)
    assert dict(match.resolved) == {C: C}
    assert match.error == "NOT_FOUND"


def test_a_short_prefix_is_refused_even_when_unique() -> None:
    short = C[: MIN_PREFIX - 1]
    match = match_job_ids([short], KNOWN)
    assert match.too_short == (short,)
    assert match.error == "USAGE"


def test_an_exact_id_matches_whatever_its_length_and_wins_over_longer_ids() -> None:
    match = match_job_ids(["job-1", "abcdef"], ["job-1", "abcdef", "abcdef12"])
    assert match.ok
    assert dict(match.resolved) == {"job-1": "job-1", "abcdef": "abcdef"}


# --- order --------------------------------------------------------------------------------------


@dataclass
class Job:
    job_id: str
    died_at: float | None


def test_jobs_are_listed_oldest_death_first_and_unknown_times_last() -> None:
    jobs = [Job("c", 300.0), Job("x", None), Job("a", 100.0), Job("b", 200.0), Job("w", None)]
    assert [j.job_id for j in order_by_age(jobs)] == ["a", "b", "c", "w", "x"]
    newest = order_by_age(jobs, newest_first=True)
    assert [j.job_id for j in newest] == ["c", "b", "a", "w", "x"]


def test_the_order_does_not_depend_on_the_order_read() -> None:
    jobs = [Job("b", 100.0), Job("a", 100.0), Job("c", 50.0)]
    expected = ["c", "a", "b"]  # same second: by job id
    assert [j.job_id for j in order_by_age(jobs)] == expected
    assert [j.job_id for j in order_by_age(list(reversed(jobs)))] == expected


# --- when a job died ----------------------------------------------------------------------------


def test_the_broker_records_when_it_dead_lettered_a_job() -> None:
    died = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    headers = {"x-death": [{"reason": "expired", "time": died, "count": 1}]}
    assert death_time(headers, sent_at=died.timestamp() - 3600) == (died.timestamp(), "x-death")


def test_our_own_dead_letters_fall_back_to_the_time_sent() -> None:
    died = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    # An old x-death on a copy modelfleet dead-lettered itself is not its death.
    headers = {"x-mf-reason": "worker_error", "x-death": [{"time": died}]}
    assert death_time(headers, sent_at=1000.0) == (1000.0, "sent")
    assert death_time({"x-mf-died-at": 1_700_000_000_250}, sent_at=1000.0) == (
        1_700_000_000.25,
        "x-mf-died-at",
    )
    assert death_time({}, sent_at=None) == (None, "unknown")


# --- broker version and the delivery-limit warning ----------------------------------------------


@pytest.mark.parametrize(
    ("raw", "version"),
    [
        ("3.10.8", (3, 10, 8)),
        (b"4.1.0", (4, 1, 0)),
        ("4.2.0-rc.1", (4, 2, 0)),
        ("4.0", (4, 0)),
        ("unknown", None),
        (None, None),
    ],
)
def test_server_versions_are_read(raw: object, version: tuple[int, ...] | None) -> None:
    assert parse_version(raw) == version


@pytest.mark.parametrize(
    ("version", "counts"),
    [
        ((3, 10, 8), False),
        ((3, 13, 7), False),
        ((4, 0, 0), True),
        ((4, 2, 5), True),
        ((4, 3, 0), False),
        (None, False),
    ],
)
def test_only_rabbitmq_4_0_to_4_2_drop_copies_returned_too_often(
    version: tuple[int, ...] | None, counts: bool
) -> None:
    assert counts_returns_towards_limit(version) is counts
    warning = returns_warning(version, 15, "ns.errors")
    assert (warning is not None) is counts


def test_the_warning_waits_until_a_copy_was_returned_often() -> None:
    assert returns_warning((4, 1, 0), 3, "ns.errors") is None
    warning = returns_warning((4, 1, 0), 12, "ns.errors")
    assert warning is not None
    assert "RabbitMQ 4.1.0" in warning and "returned 12 times" in warning
    assert "delivery-limit" in warning and "ns\\.errors" in warning


# --- the failure a replay ends with -------------------------------------------------------------


def test_a_replay_where_everything_went_well_has_no_failure() -> None:
    assert replay_failure(replayed=3, queue="ns.errors") is None
    assert replay_failure(replayed=0, queue="ns.errors") is None


def test_a_replay_failure_counts_each_kind_of_outcome_once() -> None:
    assert replay_failure(replayed=3, failed_again=1, queue="ns.errors") == (
        "1 of 3 replayed jobs failed again"
    )
    assert replay_failure(replayed=1, no_answer=1, waited_s=6.0, queue="ns.errors") == (
        "1 of 1 replayed job did not answer within 6s"
    )
    assert replay_failure(replayed=0, not_replayed=2, queue="ns.errors") == (
        "2 of 2 chosen jobs not replayed, left in ns.errors"
    )
    assert replay_failure(
        replayed=4, not_replayed=1, failed_again=2, no_answer=1, waited_s=2.5, queue="ns.errors"
    ) == (
        "2 of 4 replayed jobs failed again; 1 of 4 replayed jobs did not answer within 2.5s; "
        "1 of 5 chosen jobs not replayed, left in ns.errors"
    )


# --- hostile entries (issue 12) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain id-1.2/x:y", "plain id-1.2/x:y"),
        ("\x1b[2J\x1b]0;t\x07", "\\x1b[2J\\x1b]0;t\\x07"),
        ("a\nb\tc\rd\x00\x7f", "a\\x0ab\\x09c\\x0dd\\x00\\x7f"),
        ("csi\x9b31m\x85", "csi\\x9b31m\\x85"),
        ("bidi\u202egnp.exe\u2066\u2028", "bidi\\u202egnp.exe\\u2066\\u2028"),
        ("ünïcødé ok", "ünïcødé ok"),
    ],
)
def test_control_characters_are_escaped(raw: str, shown: str) -> None:
    assert escape_control(raw) == shown
    assert escape_control(shown) == shown  # escaping twice changes nothing more


def test_json_depth_counts_without_recursion() -> None:
    assert json_depth(b"1") == 0
    assert json_depth(b'{"a": [1, {"b": "[[[{{{"}]}') == 3
    assert json_depth('["\\"", ["\\\\"]]') == 2  # escaped quotes and backslashes in strings
    assert json_depth(b"[" * 1_000_000) == MAX_JSON_DEPTH + 1  # stops counting past the limit
    assert json_depth(b"[" * 10 + b"]" * 10, limit=5) == 6
    assert json_depth(b"]]]][[") == 2  # not JSON: some number, no error


def test_parse_body_never_raises() -> None:
    assert parse_body(b'{"v": 1, "p": [[1]]}').value == {"v": 1, "p": [[1]]}
    at_limit = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_body(at_limit).format == "json"
    deep = parse_body(b"[" * 200_000 + b"]" * 200_000)
    assert (deep.format, deep.problem) == ("text", "JSON nested deeper than 100 levels")
    assert len(deep.value) <= 1001  # a short excerpt
    assert parse_body(b"\xff\xfe\x00garbage").format == "text"
    text = parse_body(b"hello")
    assert (text.format, text.value) == ("text", "hello")
    assert text.problem is not None and text.problem.startswith("not JSON")


def test_replay_headers_are_rebuilt_not_copied() -> None:
    planted = {
        "x-mf-reason": "no_worker",
        "x-mf-error": "e",
        "x-mf-model": "m",
        "x-mf-died-at": 1,
        "x-mf-deadline": 1,
        "x-mf-replayed": 10**12,
        "x-mf-rerouted": 1,
        "x-mf-anything": "planted",
        "X-MF-Upper": "planted",
        "x-death": [{"reason": "expired"}],
        "x-delivery-count": 3,
        "traceparent": "00-abc",
    }
    headers = replay_headers(planted, replayed=2, deadline_ms=1_700_000_000_000)
    assert headers == {
        "traceparent": "00-abc",
        "x-mf-replayed": 3,
        "x-mf-deadline": 1_700_000_000_000,
    }
    assert replay_headers(None, replayed=0, deadline_ms=5) == {
        "x-mf-replayed": 1,
        "x-mf-deadline": 5,
    }
    # However large a count a caller passes, the header stays a sane 64-bit number.
    assert replay_headers({}, replayed=2**63, deadline_ms=5)["x-mf-replayed"] <= 10**7
