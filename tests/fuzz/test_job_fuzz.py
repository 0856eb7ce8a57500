"""Property-based, pure (no broker): what enters a worker or a client can only fail in the
documented way.

* ``Worker._parse`` turns any body, content type, size, routing key and headers into a ``Job``
  or raises the worker's internal ``_Failure`` with INVALID_JOB / reason ``invalid`` — never
  anything else; and whatever timestamps an accepted job carries, the worker's next heartbeat is
  still valid (a forged ``sent_at`` must not stop the heartbeats).
* ``check_model_name`` raises only ``ValueError``, accepts only ASCII ``[A-Za-z0-9_:/.-]`` names
  of at most 100 characters with single dots between other characters, and accepts every such
  name.
* ``parse_reply`` raises only ``pydantic.ValidationError``.

The fake incoming message below is a plain attribute bag: ``_parse`` only reads properties, and
this test is about parsing, not messaging (the broker tests publish real messages).
"""

from __future__ import annotations

import re
import string
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from modelfleet.client import Client
from modelfleet.config import settings_from_mapping
from modelfleet.errors import ErrorCode, InvalidModelError, JobError, error_for_code
from modelfleet.jobs import Job
from modelfleet.messages import (
    MODEL_NAME_MAX,
    ChunkReply,
    ErrorReply,
    ResultReply,
    check_model_name,
    parse_reply,
)
from modelfleet.stats import Outcome
from modelfleet.topology import DeadReason
from modelfleet.worker import Worker, _Failure
from tests.fuzz.strategies import HOSTILE_NUMBERS, dumps, hostile_values, json_values

MAX_PAYLOAD = 2_048
INVALID_CAUSES = frozenset(
    {"too_large", "content_type", "not_json", "schema", "wrong_model", "reply_to"}
)
MODELS = ("m-1", "org/m.2")
FUZZ = settings(
    max_examples=200,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


async def _echo(job: Job) -> Any:
    return job.payload


def make_worker() -> Worker:
    config = settings_from_mapping({"worker": {"max_payload_bytes": MAX_PAYLOAD}})
    return Worker(_echo, MODELS, settings=config, worker_id="fuzz", install_signal_handlers=False)


JOB_FIELDS = ["v", "model", "payload", "deadline", "stream", "sent_at"]


@st.composite
def job_shaped(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": 1,
        "model": draw(st.sampled_from([*MODELS, "other-model", "a*b", ""])),
        "payload": draw(json_values),
        "deadline": draw(st.one_of(st.none(), st.floats(), st.sampled_from(HOSTILE_NUMBERS))),
        "stream": draw(st.booleans()),
        "sent_at": draw(st.one_of(st.none(), st.floats(), st.sampled_from(HOSTILE_NUMBERS))),
    }
    for field in draw(st.lists(st.sampled_from(JOB_FIELDS), max_size=3, unique=True)):
        if draw(st.booleans()):
            body[field] = draw(hostile_values)
        else:
            body.pop(field, None)
    return body


bodies = st.one_of(
    st.binary(max_size=MAX_PAYLOAD * 2),
    json_values.map(dumps),
    job_shaped().map(dumps),
    st.integers(MAX_PAYLOAD - 100, MAX_PAYLOAD + 100).map(
        lambda n: dumps({"v": 1, "model": MODELS[0], "payload": "x" * n})
    ),
)
content_types = st.one_of(
    st.sampled_from(
        [
            None,
            "",
            "application/json",
            "text/plain",
            "application/json; charset=utf-8",
            "application/msgpack",
        ]
    ),
    st.text(max_size=20),
)
messages = st.builds(
    SimpleNamespace,
    body=bodies,
    content_type=content_types,
    routing_key=st.sampled_from([*MODELS, "other-model", "", None]),
    message_id=st.one_of(st.none(), st.text(max_size=40)),
    correlation_id=st.one_of(st.none(), st.text(max_size=40)),
    headers=st.one_of(
        st.none(),
        st.dictionaries(st.sampled_from(["x-delivery-count", "x-other"]), json_values, max_size=2),
    ),
    redelivered=st.booleans(),
    reply_to=st.one_of(
        st.none(), st.just("amq.rabbitmq.reply-to.g1h2AA5yZXBseUAx.9Yx1"), st.text(max_size=40)
    ),
)


@FUZZ
@given(messages)
@example(SimpleNamespace(body=b"{", content_type=None, routing_key="m-1", message_id="j",
                         correlation_id=None, headers=None, redelivered=False,
                         reply_to=None))  # fmt: skip
def test_parse_raises_only_invalid_job(message: SimpleNamespace) -> None:
    worker = make_worker()
    try:
        job = worker._parse(cast(Any, message))
    except _Failure as failure:
        assert failure.code is ErrorCode.INVALID_JOB
        assert failure.reason == DeadReason.INVALID
        assert failure.cause in INVALID_CAUSES  # a small fixed set: logged once per cause
        assert failure.message
        return
    assert len(message.body) <= MAX_PAYLOAD
    assert message.content_type in (None, "", "application/json")
    assert check_model_name(job.model) == job.model
    if message.routing_key:
        assert job.model == message.routing_key or job.model in MODELS

    # What _process records for a job must keep the heartbeat valid, whatever the timestamps.
    now = time.time()
    if job.sent_at is not None:
        for _ in range(3):
            worker.stats.job_started(job.model, now - job.sent_at)
            worker.stats.first_chunk(job.model, now - job.sent_at)
    remaining = job.remaining()
    for _ in range(3):
        worker.stats.job_done(job.model, Outcome.OK, 0.0 if remaining is None else -remaining)
    worker.heartbeat()


@FUZZ
@given(st.lists(st.floats(), max_size=10))
@example([1e308, 1e308])
@example([float("inf"), float("nan"), -1e308])
def test_worker_heartbeat_survives_any_recorded_timing(values: list[float]) -> None:
    worker = make_worker()
    for value in values:
        worker.stats.job_started(MODELS[0], value)
        worker.stats.first_chunk(MODELS[0], value)
        worker.stats.job_done(MODELS[0], Outcome.OK, value)
    worker.heartbeat()


# -- model names -------------------------------------------------------------------------------

ALLOWED = set(string.ascii_letters + string.digits + "_-:/.")
HOSTILE_NAMES = [
    "",
    "a" * (MODEL_NAME_MAX + 1),
    "#",
    "*",
    ".",
    "a.#",
    "llama.*",
    "a b",
    " llama",
    "llama\n",
    "ll\u0430ma",  # Cyrillic a
    "\u0406lama",  # Cyrillic I
    "llama\u200b",  # zero-width space
    "\uff4c\uff4c\uff41\uff4d\uff41",  # fullwidth "llama"
    "a\x00b",
    "a..b",
    "a.",
    ".a",
    "-a",
    "a.-b",
]


def follows_the_rules(name: str) -> bool:
    """The documented rules, written independently of the implementation's regex."""
    return (
        1 <= len(name) <= MODEL_NAME_MAX
        and set(name) <= ALLOWED
        and name[0] in string.ascii_letters + string.digits
        and all(
            i + 1 < len(name) and name[i + 1] in string.ascii_letters + string.digits + "_"
            for i, char in enumerate(name)
            if char == "."
        )
    )


segment_start = st.sampled_from(string.ascii_letters + string.digits + "_")
segment_rest = st.text(alphabet=string.ascii_letters + string.digits + "_:/-", max_size=8)
good_names = st.builds(
    lambda first, rest, more: (first + rest + "".join("." + s for s in more))[:MODEL_NAME_MAX],
    st.sampled_from(string.ascii_letters + string.digits),
    segment_rest,
    st.lists(st.builds(str.__add__, segment_start, segment_rest), max_size=5),
).filter(lambda n: not n.endswith("."))


@settings(FUZZ, max_examples=500)
@given(st.one_of(st.text(), st.text(alphabet=[*sorted(ALLOWED), "\n", " ", "#", "*"])))
def test_check_model_name_accepts_only_documented_names(name: str) -> None:
    try:
        assert check_model_name(name) == name
    except ValueError as exc:
        assert "model name" in str(exc)
        assert not follows_the_rules(name)
    else:
        assert follows_the_rules(name), repr(name)
        assert name.isascii() and re.search(r"\s", name) is None


@FUZZ
@given(good_names)
def test_check_model_name_accepts_every_documented_name(name: str) -> None:
    assert follows_the_rules(name)
    assert check_model_name(name) == name


@FUZZ
@given(st.one_of(json_values, st.binary(), st.builds(object)))
def test_check_model_name_refuses_non_strings_with_value_error(value: Any) -> None:
    if isinstance(value, str):
        return
    with pytest.raises(ValueError, match="model name"):
        check_model_name(value)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_are_refused_everywhere_before_any_io(name: str) -> None:
    with pytest.raises(ValueError, match="model name"):
        check_model_name(name)
    # A client that is not even connected refuses it (nothing could have been sent).
    with pytest.raises(InvalidModelError) as caught:
        Client()._start(name, {"prompt": "x"}, timeout=1, stream=False)
    assert caught.value.code == ErrorCode.INVALID_MODEL == 40301
    with pytest.raises(ValueError, match="model name"):
        Worker(_echo, [name], install_signal_handlers=False)


# -- replies -----------------------------------------------------------------------------------


@st.composite
def reply_shaped(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": draw(st.sampled_from(["result", "chunk", "error", "other", ""])),
        "v": draw(st.sampled_from([1, 1, 2, "1"])),
        "result": draw(json_values),
        "seq": draw(st.one_of(st.integers(), st.sampled_from(HOSTILE_NUMBERS))),
        "data": draw(json_values),
        "code": draw(st.one_of(st.integers(), st.sampled_from(HOSTILE_NUMBERS))),
        "error": "X",
        "message": draw(st.one_of(st.text(max_size=20), st.integers(0, 10_000).map("m".__mul__))),
        "model": "m",
        "job_id": "j",
    }
    for field in draw(st.lists(st.sampled_from(sorted(body)), max_size=3, unique=True)):
        if draw(st.booleans()):
            body[field] = draw(hostile_values)
        else:
            body.pop(field)
    return body


@FUZZ
@given(st.one_of(st.binary(max_size=500), json_values.map(dumps), reply_shaped().map(dumps)))
def test_parse_reply_raises_only_validation_error(body: bytes) -> None:
    try:
        reply = parse_reply(body)
    except ValidationError:
        return
    assert isinstance(reply, ResultReply | ChunkReply | ErrorReply)
    if isinstance(reply, ErrorReply):
        assert len(reply.message) <= 4096
        error = error_for_code(reply.code, reply.message, model=reply.model, job_id=reply.job_id)
        assert isinstance(error, JobError)
        assert str(error)
