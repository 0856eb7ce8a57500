"""How the gateway answers a failure: HTTP status, OpenAI error type, retry headers, and
messages a person can act on. Pure: no I/O.

OpenAI's clients (the ``openai`` package, and the SDKs generated the same way) retry 408, 409,
429 and every 5xx twice by default, unless the answer says otherwise: ``x-should-retry: true`` or
``false`` wins over the status, and ``Retry-After`` (seconds, up to 120) sets the wait. Every
error the gateway sends says which it is (:attr:`ErrorAnswer.headers`):

* ``x-should-retry: false`` — the same request would fail the same way: INVALID_JOB and
  INVALID_MODEL (400), every other 4xx (validation, 401, 404, 413), WORKER_ERROR and other 500s,
  timeouts (504: the fleet was too slow for the deadline, a retry waits as long again), a job
  the broker refused (502: a permission, the operator's fix), and NO_WORKER: 404 when the
  controller does not know the model, 503 with ``Retry-After: 10`` when it does (its workers
  are gone: the hint says when to look again, but an automatic retry a second later would
  only add NO_WORKER copies to the error queue).
* ``x-should-retry: true`` with ``Retry-After`` — waiting helps: OVERLOADED (429, 2 s: the
  queue drains), CONNECTION_LOST (502, 1 s: the broker connection comes back), the
  controller's status API down (503, 1 s).
"""

from __future__ import annotations

import email.message
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelfleet.errors import (
    ConnectionLostError,
    ExpiredError,
    InvalidJobError,
    JobCancelledError,
    JobError,
    JobTimeoutError,
    NoWorkerError,
    OverloadedError,
    StreamRestartedError,
)

__all__ = [
    "RETRY_AFTER_NO_WORKER_S",
    "RETRY_AFTER_OVERLOADED_S",
    "RETRY_AFTER_UNAVAILABLE_S",
    "ErrorAnswer",
    "answer_for",
    "answer_for_status",
    "is_json_media_type",
    "json_error_message",
    "no_worker_answer",
    "validation_message",
]

# Seconds a caller should wait before trying again (the Retry-After header).
RETRY_AFTER_OVERLOADED_S = 2
RETRY_AFTER_UNAVAILABLE_S = 1
RETRY_AFTER_NO_WORKER_S = 10


@dataclass(frozen=True)
class ErrorAnswer:
    """The HTTP side of an error: status, OpenAI error ``type``, and whether to retry."""

    status: int
    type: str
    retry: bool
    retry_after_s: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        headers = {"x-should-retry": "true" if self.retry else "false"}
        if self.retry_after_s is not None:
            headers["retry-after"] = str(self.retry_after_s)
        return headers


# First match wins: subclasses first (InvalidModelError is an InvalidJobError).
_ANSWERS: Sequence[tuple[type[JobError], ErrorAnswer]] = (
    (InvalidJobError, ErrorAnswer(400, "invalid_request_error", retry=False)),
    (
        OverloadedError,
        ErrorAnswer(429, "rate_limit_error", retry=True, retry_after_s=RETRY_AFTER_OVERLOADED_S),
    ),
    (
        NoWorkerError,
        ErrorAnswer(
            503, "service_unavailable_error", retry=False, retry_after_s=RETRY_AFTER_NO_WORKER_S
        ),
    ),
    (JobTimeoutError, ErrorAnswer(504, "timeout_error", retry=False)),
    (ExpiredError, ErrorAnswer(504, "timeout_error", retry=False)),
    (
        ConnectionLostError,
        ErrorAnswer(502, "bad_gateway_error", retry=True, retry_after_s=RETRY_AFTER_UNAVAILABLE_S),
    ),
    # Mid-stream only (the status line is gone by then): the type is what counts.
    (StreamRestartedError, ErrorAnswer(502, "bad_gateway_error", retry=True)),
    (JobCancelledError, ErrorAnswer(499, "cancelled_error", retry=False)),
)
_SERVER_ERROR = ErrorAnswer(500, "server_error", retry=False)  # WORKER_ERROR and the rest
_NOT_FOUND = ErrorAnswer(404, "not_found_error", retry=False)
_NO_WORKER = dict(_ANSWERS)[NoWorkerError]


def answer_for(exc: JobError) -> ErrorAnswer:
    """The answer to a job error (NO_WORKER: see :func:`no_worker_answer`)."""
    for cls, answer in _ANSWERS:
        if isinstance(exc, cls):
            return answer
    return _SERVER_ERROR


def no_worker_answer(known: bool | None) -> ErrorAnswer:
    """NO_WORKER for a model the controller does not know (never served, or forgotten after
    ``routing.forget_after_s`` without workers): 404; known, or the controller could not tell
    (``None``): 503 with a Retry-After hint. Neither is retried automatically."""
    return _NOT_FOUND if known is False else _NO_WORKER


def answer_for_status(status: int) -> ErrorAnswer:
    """The answer for an HTTP-level error of the gateway itself (no job behind it)."""
    if status == 503:
        return ErrorAnswer(
            503, "service_unavailable_error", retry=True, retry_after_s=RETRY_AFTER_UNAVAILABLE_S
        )
    if status == 502:
        return ErrorAnswer(502, "bad_gateway_error", retry=False)
    types = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
    if status >= 500:
        return ErrorAnswer(status, "server_error", retry=False)
    return ErrorAnswer(status, types.get(status, "invalid_request_error"), retry=False)


# -- request bodies that cannot be read ----------------------------------------------------------


def is_json_media_type(content_type: str | None) -> bool:
    """``application/json`` or ``application/*+json`` (parameters such as charset allowed);
    no Content-Type at all counts as JSON (the gateway reads such a body as JSON)."""
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def json_error_message(error: str, document: str | bytes | None, position: int) -> str:
    """``"request body is not valid JSON: Expecting ',' delimiter at line 1, column 18"``."""
    where = ""
    if isinstance(document, bytes):
        document = document.decode("utf-8", errors="replace")
    if isinstance(document, str) and 0 <= position <= len(document):
        line = document.count("\n", 0, position) + 1
        column = position - document.rfind("\n", 0, position)
        where = f" at line {line}, column {column}"
    return f"request body is not valid JSON: {error}{where}"


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number"}
    names |= {float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def validation_message(
    errors: Sequence[Mapping[str, Any]], body: Any, content_type: str | None
) -> tuple[str, str | None]:
    """The message and ``param`` for a request the gateway cannot accept, from FastAPI's
    validation errors (``RequestValidationError.errors()``), the body it read, and the
    request's Content-Type."""
    if not is_json_media_type(content_type):
        return (
            f"Content-Type must be application/json, not {content_type!r}: send the request "
            "body as JSON with 'Content-Type: application/json'",
            None,
        )
    first = errors[0] if errors else {}
    kind = first.get("type")
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if kind == "json_invalid":
        context = first.get("ctx") or {}
        raw = first.get("loc", ("body", -1))
        position = raw[-1] if raw and isinstance(raw[-1], int) else -1
        return json_error_message(str(context.get("error", "cannot parse")), body, position), None
    if not where:
        if kind == "missing" or body in (None, b"", ""):
            return "request body is empty: send a JSON object", None
        return (f"request body must be a JSON object, not {_json_type(body)}", None)
    param = _param(where, body)
    return f"invalid request: {param}: {first.get('msg', 'invalid value')}", param


def _param(where: Sequence[str], body: Any) -> str:
    """The request field an error is about: its location, followed through the body as far as
    the body goes, plus the one missing key (pydantic's union member tags, such as ``str`` in
    ``stop.str``, are not fields)."""
    path: list[str] = []
    value = body
    for part in where:
        if isinstance(value, dict):
            path.append(part)
            if part not in value:
                break
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            path.append(part)
            value = value[int(part)]
        else:
            break
    return ".".join(path) or ".".join(where)
