"""Message contracts: model names, heartbeat bounds, replies."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from modelfleet.errors import ErrorCode
from modelfleet.messages import (
    ChunkReply,
    ErrorReply,
    Heartbeat,
    JobRequest,
    ResultReply,
    check_model_name,
    parse_reply,
)

# --- model names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "llama-3-8b",
        "vicuna-7b-v1.5",
        "meta-llama/Llama-3.1-8B",
        "llama3:8b",
        "a",
        "m_1",
        "a" * 100,
    ],
)
def test_good_model_names_are_accepted(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * 101,
        "a#b",  # AMQP topic wildcard
        "a*b",  # AMQP topic wildcard
        ".",
        "a..b",
        "a.",
        ".a",
        "a b",
        "ll\u0430ma",  # Cyrillic a: looks like "llama"
        "-a",
        "a\nb",
    ],
)
def test_bad_model_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="model name"):
        check_model_name(name)


@pytest.mark.parametrize("name", [None, 42, b"llama", ["llama"]])
def test_non_string_model_names_are_refused(name: object) -> None:
    with pytest.raises(ValueError, match="must be a string"):
        check_model_name(name)


def test_job_request_checks_its_model() -> None:
    assert JobRequest(model="llama3:8b", payload={"p": 1}).model == "llama3:8b"
    with pytest.raises(ValidationError):
        JobRequest(model="a*b")


# --- heartbeats -------------------------------------------------------------------------------


def heartbeat(**fields: Any) -> Heartbeat:
    data: dict[str, Any] = {
        "worker_id": "w1",
        "models": ("llama",),
        "concurrency": 4,
        "sent_at": 1_700_000_000.0,
        "interval_s": 2.0,
    }
    data.update(fields)
    return Heartbeat(**data)


def test_valid_heartbeat_round_trips_through_json() -> None:
    hb = heartbeat(models=("llama", "meta-llama/Llama-3.1-8B"), in_flight=2, seq=7)
    assert Heartbeat.model_validate_json(hb.model_dump_json()) == hb
    assert hb.v == 1


@pytest.mark.parametrize("field", ["oldest_job_age_s", "speed", "sent_at", "interval_s"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_heartbeat_refuses_nan_and_inf(field: str, value: float) -> None:
    with pytest.raises(ValidationError):
        heartbeat(**{field: value})


@pytest.mark.parametrize(
    "field",
    [
        "concurrency",
        "in_flight",
        "oldest_job_age_s",
        "stuck_jobs",
        "speed",
        "pid",
        "interval_s",
        "seq",
    ],
)
def test_heartbeat_refuses_negative_numbers(field: str) -> None:
    with pytest.raises(ValidationError) as info:
        heartbeat(**{field: -1})
    assert info.value.errors()[0]["loc"] == (field,)


def test_heartbeat_refuses_negative_counters() -> None:
    with pytest.raises(ValidationError):
        heartbeat(counters={"ok": -1})


def test_heartbeat_refuses_duplicate_models() -> None:
    with pytest.raises(ValidationError, match="twice"):
        heartbeat(models=("llama", "mistral", "llama"))


def test_heartbeat_carries_at_most_64_models() -> None:
    assert len(heartbeat(models=tuple(f"m{i}" for i in range(64))).models) == 64
    with pytest.raises(ValidationError):
        heartbeat(models=tuple(f"m{i}" for i in range(65)))


def test_heartbeat_needs_a_model() -> None:
    with pytest.raises(ValidationError):
        heartbeat(models=())


def test_heartbeat_refuses_bad_model_names() -> None:
    with pytest.raises(ValidationError, match="model name"):
        heartbeat(models=("llama", "a#b"))


@pytest.mark.parametrize("version", [0, 2, "1"])
def test_heartbeat_refuses_other_schema_versions(version: object) -> None:
    with pytest.raises(ValidationError):
        heartbeat(v=version)


def test_heartbeat_is_frozen() -> None:
    hb = heartbeat()
    with pytest.raises(ValidationError):
        hb.in_flight = 3  # type: ignore[misc]


# --- replies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        ResultReply(
            result={"text": "hi", "tokens": [1, 2]}, worker_id="w1", duration_s=0.5, chunks=2
        ),
        ChunkReply(seq=3, data="tok"),
        ErrorReply.build(ErrorCode.NO_WORKER, "no live worker", model="llama", job_id="j-1"),
    ],
    ids=["result", "chunk", "error"],
)
def test_parse_reply_round_trips(reply: ResultReply | ChunkReply | ErrorReply) -> None:
    parsed = parse_reply(reply.model_dump_json().encode())
    assert type(parsed) is type(reply)
    assert parsed == reply


def test_error_reply_build_names_the_code() -> None:
    reply = ErrorReply.build(ErrorCode.OVERLOADED, "queue full", model="m", job_id="j")
    assert (reply.code, reply.error, reply.kind) == (42903, "OVERLOADED", "error")


@pytest.mark.parametrize(
    "body",
    [
        b'{"kind": "surprise"}',
        b"{}",
        b"not json",
        b'{"kind": "chunk"}',
        b'{"kind": "result", "v": 2}',
    ],
)
def test_parse_reply_refuses_other_bodies(body: bytes) -> None:
    with pytest.raises(ValidationError):
        parse_reply(body)


def test_error_reply_message_is_bounded() -> None:
    long = ErrorReply.build(ErrorCode.WORKER_ERROR, "x" * 10_000, model="m", job_id="j")
    assert len(long.message) == 4096
    assert long.message.endswith("...")
    exact = ErrorReply.build(ErrorCode.WORKER_ERROR, "y" * 4096, model="m", job_id="j")
    assert exact.message == "y" * 4096
