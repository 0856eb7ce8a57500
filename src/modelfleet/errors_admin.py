"""``modelfleet errors list|show|replay|purge``: the error queue ``{ns}.errors``, for people.

Every job that failed for good is kept in ``{ns}.errors`` with its reason (``x-mf-reason`` or
the broker's ``x-death``), its model and, for failures modelfleet saw, the error text
(``x-mf-error``). These commands read it, send chosen jobs back to their model, or delete them.

Job ids: wherever a command takes a JOB_ID, a prefix of at least :data:`MIN_PREFIX` (6)
characters will do when exactly one job id in the queue starts with it (an exact id of any
length always matches). A prefix that several jobs share is refused with the candidates listed;
one that matches nothing is NOT_FOUND. A command given several JOB_IDs does nothing unless every
one of them names exactly one job.

How the queue is read without losing anything: AMQP 0-9-1 has no "browse" for a quorum queue,
so the copies are fetched with ``basic.get`` *without* acknowledging them, all on one channel.
The ones a command removes (replayed or purged) are acknowledged; closing the channel (or the
connection, or the process dying: the broker sees the socket close) hands every other one back
to the broker, which puts it back in the queue. Nothing is ever acknowledged before what it was
for is done, so a crash at any point leaves every copy in the queue.

What reading changes, and why the listing does not show it:

* Each hand-back counts as a delivery: on RabbitMQ 3.x (and up to 4.2) a quorum queue adds one
  to a copy's ``x-delivery-count`` every time it is returned, whether by a reject or by a
  reader's channel closing. There is no way to read a quorum queue over AMQP 0-9-1 that does not
  count, so the number mostly counts *our own* listings: it is not a property of the job and
  is not shown (neither in ``list`` nor in ``show``'s headers), so that listing twice prints the
  same thing twice. What ``list`` shows instead cannot change by being read: REPLAYED is our own
  header ``x-mf-replayed`` (how many times ``errors replay`` already sent the job back), and
  the age is computed from the time the job died (see :func:`death_time`).
* The count is still used for one thing: RabbitMQ 4.0 to 4.2 give every quorum queue without a
  ``delivery-limit`` a default limit of 20, counted on every return, and would *drop* a copy
  listed that often. When the broker is one of those (its version is read from the
  connection's server properties) and a copy was returned :data:`RETURNS_WARNING` times or
  more, ``list`` says so and how to lift the limit with a policy. RabbitMQ 3.x has no default
  limit, and 4.3 counts only failed deliveries (rejects), not hand-backs: no warning there.
* While a command runs, the copies it holds are invisible to anybody else reading the queue (a
  second ``errors list`` at the same moment sees fewer).
* Every command reads the whole queue (up to ``--max-scan`` copies, so a longer queue shows a
  part of it), and the listing is ordered by the time each job died, oldest first (or newest
  first with ``--newest-first``; ties by job id), never by position in the queue, which reads
  shuffle: the same copies list the same way every time.

A replayed job is a new publish to ``{ns}.jobs`` with the model as routing key, the same job id
and a fresh deadline (expiration, ``x-mf-deadline`` and the body's ``deadline``). Its
``reply_to`` is dropped, because the producer that waited for it is gone, unless
``--keep-reply-to``; with ``--wait`` it is this command's own direct reply-to, and the command
waits for each answer until the job's new deadline. It is published with a publisher confirm
first and removed from the error queue after, so a crash in between leaves it in both places
(never in neither). ``errors replay`` says each job's outcome once, on stdout, and ends with one
``REPLAY_FAILED`` failure on stderr (:func:`replay_failure`) when any job was not replayed or,
under ``--wait``, failed again or did not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import math
import re
import sys
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from pydantic import ValidationError

from modelfleet import console
from modelfleet.config import Settings
from modelfleet.connections import connect_plain
from modelfleet.console import report_error
from modelfleet.errors import BrokerError, ErrorCode
from modelfleet.messages import ErrorReply, ResultReply, check_model_name, parse_reply
from modelfleet.topology import (
    DEADLINE_HEADER,
    DIED_AT_HEADER,
    ERROR_HEADER,
    MODEL_HEADER,
    REASON_HEADER,
    DeadReason,
    Names,
    dead_reason,
)

__all__ = [
    "KNOWN_REASONS",
    "MAX_JSON_DEPTH",
    "MIN_PREFIX",
    "PURGE_SKIPPED",
    "REPLAY_FAILED",
    "UNKNOWN_REASON",
    "Aged",
    "Answer",
    "Body",
    "DeadJob",
    "ErrorQueue",
    "ErrorQueueMissing",
    "IdMatch",
    "JobIdError",
    "NotReplayed",
    "ReplayOutcome",
    "Selection",
    "add_errors_parser",
    "counts_returns_towards_limit",
    "death_time",
    "escape_control",
    "json_depth",
    "list_errors",
    "match_job_ids",
    "order_by_age",
    "parse_body",
    "parse_version",
    "purge_errors",
    "replay_errors",
    "replay_failure",
    "replay_headers",
    "returns_warning",
    "run_errors",
    "show_error",
]

# Headers a replay drops: the record of the last death (a new one gets its own) and ours.
REPLAYED_HEADER = "x-mf-replayed"
# When modelfleet dead-lettered the copy itself (integer epoch milliseconds). Read when present;
# modelfleet.topology.dead_copy does not set it yet, so copies modelfleet dead-lettered fall back
# to the time the job was sent (see death_time).
# The broker's count of returns; counts our own reads (see the module doc): never shown.
_BROKER_COUNT_HEADERS = frozenset({"x-delivery-count", "x-acquired-count"})
_DEATH_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        *_BROKER_COUNT_HEADERS,
        REASON_HEADER,
        ERROR_HEADER,
        MODEL_HEADER,
        DIED_AT_HEADER,
        "x-mf-rerouted",
    }
)
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
DEFAULT_LIMIT = 100
DEFAULT_MAX_SCAN = 100_000
# A job id prefix must be at least this long (an exact id of any length always matches): the
# ids modelfleet makes are 32 hex digits, and replay/purge act on what a prefix names.
MIN_PREFIX = 6
# Candidates an ambiguous prefix lists at most.
_MAX_CANDIDATES = 10
# A copy returned this often is worth a warning where returns count towards a delivery limit.
RETURNS_WARNING = 10
# RabbitMQ 4.0-4.2: the default delivery-limit of a quorum queue, counted on every return.
DEFAULT_DELIVERY_LIMIT = 20
# --wait waits this much longer than the replayed job's deadline, for its answer to travel.
WAIT_GRACE_S = 1.0
# Every reason a copy can have (the choices of --reason): modelfleet's own (x-mf-reason),
# the broker's x-death reasons in our words (topology.dead_reason maps expired, rejected,
# delivery_limit and maxlen), and "unknown" for a copy that records neither.
UNKNOWN_REASON = "unknown"
KNOWN_REASONS = (
    DeadReason.NO_WORKER,
    DeadReason.WORKER_ERROR,
    DeadReason.INVALID,
    DeadReason.EXPIRED,
    DeadReason.DELIVERY_LIMIT,
    DeadReason.OVERLOADED,
    DeadReason.REJECTED,
    UNKNOWN_REASON,
)
# The failure `errors replay` ends with when a chosen job was not replayed or, under --wait,
# failed again or did not answer (each job's own outcome is on stdout).
REPLAY_FAILED = "REPLAY_FAILED"
# The failure `errors purge` ends with when it left broken entries in the queue.
PURGE_SKIPPED = "PURGE_SKIPPED"

# Anyone who may publish jobs can plant entries (the controller copies a job for an unknown
# model here as it came): bodies are parsed only when they nest at most this deep, and a body
# that is not shown as JSON is shown as an excerpt of at most BODY_EXCERPT characters.
MAX_JSON_DEPTH = 100
BODY_EXCERPT = 1000
# x-mf-replayed above this is no count we wrote: read as 0 (and never overflows when added to).
MAX_REPLAYED = 1_000_000
# Headers of ours, by prefix: a replay rebuilds them and drops every other one (a producer may
# have set any of them on the job the entry was copied from).
OUR_HEADER_PREFIX = "x-mf-"

EXIT_OK = 0
EXIT_FAILED = 1  # a job failed (again), or nothing matched (NOT_FOUND)
EXIT_USAGE = 2
EXIT_BROKER = 3


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def _jsonable(value: Any, depth: int = 0) -> Any:
    """AMQP table values (bytes, datetime, Decimal, nested tables) as JSON-friendly values;
    tables and lists nested deeper than MAX_JSON_DEPTH are cut off (shown as "…")."""
    if depth > MAX_JSON_DEPTH:
        return "…"
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# -- pure logic ------------------------------------------------------------------------------

# C0 controls, DEL, C1 controls (0x9b is a one-byte CSI), the Unicode line separators and the
# bidirectional overrides and isolates (text that reads differently from how it is stored).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escaped(found: re.Match[str]) -> str:
    code = ord(found.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    r"""``text`` safe to print for a person: every control character (C0 including newline and
    tab, DEL, C1, line separators, bidi overrides) written as a Python escape, so an entry
    cannot move the cursor, recolour or clear the terminal, or break a table's lines.

    >>> escape_control("job\x1b[2Jid")
    'job\\x1b[2Jid'
    """
    return _CONTROL.sub(_escaped, text)


def _safe_lines(text: str) -> str:
    """Several lines to print: each escaped, the newlines between them kept."""
    return "\n".join(escape_control(line) for line in text.split("\n"))


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(data: bytes | str, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply arrays and objects nest in JSON text, counted without recursion (brackets in
    strings do not count); counting stops past ``limit`` (the result is then ``limit + 1``).
    Not a validator: for text that is not JSON it is some number, never an error.

    >>> json_depth(b'{"a": [1, {"b": "[[["}]}')
    3
    """
    raw = data.encode("utf-8", errors="surrogatepass") if isinstance(data, str) else data
    depth = deepest = 0
    for bracket in _JSON_BRACKETS.findall(_JSON_STRING.sub(b"", raw)):
        if bracket in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return limit + 1
        else:
            depth = max(0, depth - 1)
    return deepest


@dataclass(frozen=True)
class Body:
    """A job body as the error-queue tools show and replay it (see :func:`parse_body`)."""

    format: str  # "json", or "text" (not JSON: shown as an excerpt)
    value: Any  # the parsed JSON, or the excerpt
    problem: str | None = None  # why it is not shown as JSON, when it could have been


def _excerpt(body: bytes, width: int = BODY_EXCERPT) -> str:
    text = body[: width * 4].decode(errors="replace")
    return text if len(text) <= width and len(body) <= width * 4 else text[:width] + "…"


def parse_body(body: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Body:
    """A body parsed as JSON when it is UTF-8 JSON nesting at most ``max_depth`` levels; else a
    short excerpt and the problem. Never raises (no RecursionError, however deep).

    >>> parse_body(b'{"v": 1}')
    Body(format='json', value={'v': 1}, problem=None)
    >>> parse_body(b"[" * 500).problem
    'JSON nested deeper than 100 levels'
    """
    if json_depth(body, max_depth) > max_depth:
        return Body("text", _excerpt(body), f"JSON nested deeper than {max_depth} levels")
    try:
        return Body("json", json.loads(body))
    except UnicodeDecodeError:
        return Body("text", _excerpt(body), "not UTF-8")
    except (ValueError, RecursionError) as exc:
        return Body("text", _excerpt(body), f"not JSON ({str(exc)[:100]})")


def _replayed_count(value: Any) -> int:
    """x-mf-replayed as we write it (a positive int up to MAX_REPLAYED), else 0."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_REPLAYED:
        return value
    return 0


def replay_headers(
    headers: Mapping[str, Any] | None, *, replayed: int, deadline_ms: int
) -> dict[str, Any]:
    """The headers of a replayed job: the entry's own headers without the record of its death
    and without any ``x-mf-*`` header (a producer may have set any of them), and ours rebuilt
    from what the command knows: ``x-mf-replayed`` (``replayed``, the times it was replayed
    before, plus one) and ``x-mf-deadline`` (integer epoch milliseconds).

    >>> replay_headers({"x-mf-reason": "no_worker", "x-mf-evil": 1, "trace": "t"},
    ...                replayed=0, deadline_ms=5)
    {'trace': 't', 'x-mf-replayed': 1, 'x-mf-deadline': 5}
    """
    kept = {
        k: v
        for k, v in (headers or {}).items()
        if k not in _DEATH_HEADERS and not str(k).lower().startswith(OUR_HEADER_PREFIX)
    }
    kept[REPLAYED_HEADER] = min(max(replayed, 0), MAX_REPLAYED) + 1
    kept[DEADLINE_HEADER] = deadline_ms
    return kept


def _epoch(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        number = float(value)
        return number if math.isfinite(number) and number > 0 else None
    return None


def death_time(
    headers: Mapping[str, Any] | None, sent_at: float | None
) -> tuple[float | None, str]:
    """When a copy's job died (epoch seconds), and where that came from.

    In order: our header ``x-mf-died-at`` (epoch milliseconds); for a copy the broker
    dead-lettered (no ``x-mf-reason``), the ``time`` of the newest ``x-death`` record; else the
    time the job was sent (the message timestamp; a job dies within its deadline of it), marked
    ``"sent"``; else unknown. Second resolution for the broker's times.

    >>> death_time({"x-mf-died-at": 1700000000500}, None)
    (1700000000.5, 'x-mf-died-at')
    >>> death_time({}, 1700000000.0)
    (1700000000.0, 'sent')
    """
    headers = headers or {}
    ours = _epoch(headers.get(DIED_AT_HEADER))
    if ours is not None:
        return ours / 1000, DIED_AT_HEADER
    if REASON_HEADER not in headers:
        deaths = headers.get("x-death")
        if isinstance(deaths, (list, tuple)) and deaths and isinstance(deaths[0], Mapping):
            when = _epoch(deaths[0].get("time"))
            if when is not None:
                return when, "x-death"
    if sent_at is not None:
        return sent_at, "sent"
    return None, "unknown"


class Aged(Protocol):
    """What :func:`order_by_age` needs of a job."""

    @property
    def job_id(self) -> str: ...

    @property
    def died_at(self) -> float | None: ...


_J = TypeVar("_J", bound=Aged)


def order_by_age(jobs: Iterable[_J], *, newest_first: bool = False) -> list[_J]:
    """Jobs by the time they died, oldest first (or newest first); ties by job id, jobs whose
    time is unknown last. The same jobs give the same order however the queue was shuffled."""
    known = [job for job in jobs if job.died_at is not None]
    unknown = sorted((job for job in jobs if job.died_at is None), key=lambda job: job.job_id)
    known.sort(key=lambda job: (job.died_at, job.job_id), reverse=newest_first)
    return known + unknown


@dataclass(frozen=True)
class IdMatch:
    """What each JOB_ID given turned out to name (see :func:`match_job_ids`)."""

    resolved: Mapping[str, str]  # given -> the one job id it names
    missing: tuple[str, ...] = ()  # given, no job id starts with it
    ambiguous: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # given -> ids
    too_short: tuple[str, ...] = ()  # given, not an id and shorter than the minimum prefix

    @property
    def ok(self) -> bool:
        return not (self.missing or self.ambiguous or self.too_short)

    @property
    def error(self) -> str:
        """The console error name: USAGE for a bad prefix, NOT_FOUND when only misses."""
        return console.USAGE if (self.ambiguous or self.too_short) else console.NOT_FOUND


def match_job_ids(
    wanted: Iterable[str], known: Iterable[str], *, min_prefix: int = MIN_PREFIX
) -> IdMatch:
    """Resolve JOB_IDs given by a person against the job ids in the queue.

    An exact id always matches itself. Anything else is a prefix: it must be at least
    ``min_prefix`` characters and start exactly one of the ids (copies of one job share an id:
    that is one match).

    >>> match_job_ids(["9f0c2b"], ["9f0c2b7e61", "1d2e3f4051"]).resolved
    {'9f0c2b': '9f0c2b7e61'}
    """
    ids = sorted(set(known))
    exact = set(ids)
    resolved: dict[str, str] = {}
    missing: list[str] = []
    ambiguous: dict[str, tuple[str, ...]] = {}
    too_short: list[str] = []
    for given in dict.fromkeys(wanted):
        if given in exact:
            resolved[given] = given
        elif len(given) < min_prefix:
            too_short.append(given)
        else:
            hits = tuple(i for i in ids if i.startswith(given))
            if len(hits) == 1:
                resolved[given] = hits[0]
            elif hits:
                ambiguous[given] = hits
            else:
                missing.append(given)
    return IdMatch(resolved, tuple(missing), ambiguous, tuple(too_short))


def parse_version(value: Any) -> tuple[int, ...] | None:
    """``"3.10.8"`` (or bytes, or ``"4.1.0-rc.1"``) as ``(3, 10, 8)``; None if unreadable."""
    text = _text(value)
    if text is None:
        return None
    found = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if found is None:
        return None
    return tuple(int(part) for part in found.groups() if part is not None)


def counts_returns_towards_limit(version: tuple[int, ...] | None) -> bool:
    """Whether this RabbitMQ gives a quorum queue without one a default delivery limit counted
    on every return (4.0 to 4.2). 3.x has no default limit; 4.3 counts failed deliveries only."""
    return version is not None and (4, 0) <= version[:2] < (4, 3)


def returns_warning(version: tuple[int, ...] | None, most_returned: int, queue: str) -> str | None:
    """The note ``errors list`` prints when reading the queue may make the broker drop copies:
    the broker counts returns towards its default limit and a copy came close. None otherwise."""
    if not counts_returns_towards_limit(version) or most_returned < RETURNS_WARNING:
        return None
    shown = ".".join(str(part) for part in version or ())
    return (
        f"note: RabbitMQ {shown} drops a quorum-queue message returned {DEFAULT_DELIVERY_LIMIT} "
        f"times unless a policy sets delivery-limit, and every errors command returns the "
        f"copies it reads; some copies in {queue} were returned {most_returned} times. Lift "
        f"the limit: rabbitmqctl set_policy mf-errors '^{re.escape(queue)}$' "
        f"'{{\"delivery-limit\":-1}}' --apply-to quorum_queues"
    )


def replay_failure(
    *,
    replayed: int,
    not_replayed: int = 0,
    failed_again: int = 0,
    no_answer: int = 0,
    waited_s: float | None = None,
    queue: str,
) -> str | None:
    """The one failure line ``errors replay`` ends with (each job's own outcome is printed on
    stdout before it): how many chosen jobs were not replayed, and under ``--wait`` how many
    replayed ones failed again or did not answer. None when every job went well.

    >>> replay_failure(replayed=3, failed_again=1, queue="ns.errors")
    '1 of 3 replayed jobs failed again'
    """
    parts: list[str] = []
    if failed_again:
        parts.append(f"{failed_again} of {replayed} replayed {_jobs(replayed)} failed again")
    if no_answer:
        within = f" within {waited_s:g}s" if waited_s is not None else ""
        parts.append(f"{no_answer} of {replayed} replayed {_jobs(replayed)} did not answer{within}")
    if not_replayed:
        chosen = replayed + not_replayed
        parts.append(
            f"{not_replayed} of {chosen} chosen {_jobs(chosen)} not replayed, left in {queue}"
        )
    return "; ".join(parts) or None


def _jobs(count: int) -> str:
    return "job" if count == 1 else "jobs"


# -- reading the queue -----------------------------------------------------------------------


@dataclass
class DeadJob:
    """One copy in the error queue, still held (unacknowledged) by the reader that got it."""

    message: AbstractIncomingMessage = field(repr=False)
    job_id: str
    model: str
    reason: str
    error: str
    died_at: float | None  # epoch seconds; see death_time
    died_at_source: str  # "x-mf-died-at", "x-death", "sent" or "unknown"
    replayed: int  # times `errors replay` sent it back already (x-mf-replayed)
    # The broker's x-delivery-count: grows with every read, ours included. Not a property of
    # the job; used only for the delivery-limit warning (see the module doc).
    broker_returns: int
    body: Body = field(repr=False, default_factory=lambda: Body("json", None))
    # Why the entry is broken (a body that is not JSON, nested too deep; control characters in
    # its id or model; unreadable headers): `replay --all` and `purge --all` skip it and say so.
    problem: str | None = None

    @classmethod
    def of(cls, message: AbstractIncomingMessage, names: Names) -> DeadJob:
        """The copy as a job; an entry that cannot be read as one (a producer can plant any
        headers) is a job with a :attr:`problem`, never an exception that stops a scan."""
        try:
            return cls._of(message, names)
        except Exception as exc:  # anything a hostile entry can make the reading raise
            job_id = message.message_id if isinstance(message.message_id, str) else None
            return cls(
                message=message,
                job_id=job_id or "?",
                model="?",
                reason=UNKNOWN_REASON,
                error=f"unreadable entry: {type(exc).__name__}",
                died_at=None,
                died_at_source="unknown",
                replayed=0,
                broker_returns=0,
                body=parse_body(message.body),
                problem=f"unreadable entry ({type(exc).__name__}: {str(exc)[:100]})",
            )

    @classmethod
    def _of(cls, message: AbstractIncomingMessage, names: Names) -> DeadJob:
        headers = message.headers or {}
        # Our header; else the model queue the broker dead-lettered it from; else the routing
        # key (the model, for jobs published to the jobs exchange).
        model_prefix = names.model_queue("")
        died_in = _text(headers.get("x-first-death-queue")) or ""
        model = _text(headers.get(MODEL_HEADER)) or ""
        if not model and died_in.startswith(model_prefix):
            model = died_in.removeprefix(model_prefix)
        model = model or (message.routing_key or "").removeprefix(model_prefix) or "?"
        reason = dead_reason(headers)
        error = _text(headers.get(ERROR_HEADER))
        if error is None:
            where = f" in {died_in}" if died_in else ""
            error = f"dead-lettered by the broker: {reason}{where}"
        count = headers.get("x-delivery-count")
        replayed = headers.get(REPLAYED_HEADER)
        stamp = message.timestamp
        died_at, source = death_time(
            headers, stamp.timestamp() if isinstance(stamp, datetime) else None
        )
        job_id = message.message_id or message.correlation_id or "?"
        body = parse_body(message.body)
        problem = body.problem and f"body {body.problem}"
        if _CONTROL.search(job_id):
            problem = "job id holds control characters"
        elif _CONTROL.search(model):
            problem = "model name holds control characters"
        return cls(
            message=message,
            job_id=job_id,
            model=model,
            reason=reason,
            error=error,
            died_at=died_at,
            died_at_source=source,
            replayed=_replayed_count(replayed),
            broker_returns=count if isinstance(count, int) else 0,
            body=body,
            problem=problem,
        )

    def age_s(self, now: float | None = None) -> float | None:
        """Seconds since the job died (see :func:`death_time`)."""
        if self.died_at is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.died_at)

    def summary(self, now: float | None = None) -> dict[str, Any]:
        age = self.age_s(now)
        return {
            "job_id": self.job_id,
            "model": self.model,
            "reason": self.reason,
            "died_at": self.died_at,
            "died_at_source": self.died_at_source,
            "age_s": None if age is None else round(age, 3),
            "replayed": self.replayed,
            "error": self.error,
            "problem": self.problem,
        }

    def details(self, now: float | None = None) -> dict[str, Any]:
        """Everything about the copy: summary, AMQP properties, headers, decoded body (the
        broker's return counters left out: they count reads, see the module doc)."""
        m = self.message
        properties = {
            "content_type": m.content_type,
            "content_encoding": m.content_encoding,
            "correlation_id": m.correlation_id,
            "reply_to": m.reply_to,
            "expiration": m.expiration,
            "message_id": m.message_id,
            "timestamp": m.timestamp.isoformat() if m.timestamp else None,
            "type": m.type,
            "user_id": m.user_id,
            "app_id": m.app_id,
            "priority": m.priority,
            "delivery_mode": int(m.delivery_mode) if m.delivery_mode else None,
            "routing_key": m.routing_key,
            "exchange": m.exchange,
        }
        headers = {k: v for k, v in (m.headers or {}).items() if k not in _BROKER_COUNT_HEADERS}
        return {
            **self.summary(now),
            "properties": {k: v for k, v in properties.items() if v not in (None, "")},
            "headers": _jsonable(headers),
            "body_format": self.body.format,
            "body_bytes": len(m.body),
            "body": self.body.value,
        }


@dataclass(frozen=True)
class Selection:
    """Which copies a command acts on: given job ids or unique prefixes (all when none),
    narrowed by model/reason."""

    job_ids: frozenset[str] = frozenset()
    everything: bool = False
    model: str | None = None
    reason: str | None = None

    @property
    def chooses_nothing(self) -> bool:
        """True unless it names jobs, says ``--all``, or filters by model or reason."""
        return not (self.job_ids or self.everything or self.model or self.reason)

    def matches(self, job: DeadJob) -> bool:
        """Exact ids only: :meth:`ErrorQueue.scan` resolves prefixes first."""
        if self.job_ids and job.job_id not in self.job_ids:
            return False
        if self.model is not None and job.model != self.model:
            return False
        return self.reason is None or job.reason == self.reason


class ErrorQueueMissing(BrokerError):
    """The namespace has no error queue (a wrong namespace, most likely)."""


class JobIdError(LookupError):
    """Some JOB_ID given named no job, or several, or was too short for a prefix."""

    def __init__(self, match: IdMatch, queue: str, *, truncated_at: int | None = None) -> None:
        self.match = match
        self.queue = queue
        self.error = match.error
        parts: list[str] = []
        for given, ids in match.ambiguous.items():
            shown = ", ".join(escape_control(i) for i in ids[:_MAX_CANDIDATES])
            more = f" and {len(ids) - _MAX_CANDIDATES} more" if len(ids) > _MAX_CANDIDATES else ""
            parts.append(
                f"job id prefix {given!r} is ambiguous, it starts {len(ids)} job ids: "
                f"{shown}{more}; give more characters"
            )
        for given in match.too_short:
            parts.append(
                f"{given!r} is no job id in {queue}, and a prefix needs at least "
                f"{MIN_PREFIX} characters"
            )
        for given in match.missing:
            parts.append(f"no job id in {queue} starts with {given!r}")
        if truncated_at is not None and (match.missing or match.too_short):
            parts.append(f"only the first {truncated_at} copies were read (--max-scan)")
        super().__init__("; ".join(parts))


def _server_version(connection: AbstractConnection) -> tuple[int, ...] | None:
    """The broker's version from the connection's server properties (aiormq keeps them)."""
    underlay = getattr(getattr(connection, "transport", None), "connection", None)
    properties = getattr(underlay, "server_properties", None)
    if not isinstance(properties, Mapping):
        return None
    return parse_version(properties.get("version"))


class ErrorQueue:
    """Copies of ``{ns}.errors`` fetched unacknowledged on one channel (see the module doc).

    >>> async with ErrorQueue.open(settings) as errors:
    ...     jobs = await errors.scan()
    ...     await errors.remove(jobs[0])  # the others go back when the block ends
    """

    def __init__(
        self,
        settings: Settings,
        connection: AbstractConnection,
        channel: AbstractChannel,
        queue: AbstractQueue,
    ) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.connection = connection
        self.channel = channel
        self.queue = queue
        # Copies in the queue when it was opened (ready ones; others may be held elsewhere).
        self.in_queue = int(queue.declaration_result.message_count or 0)
        self.held: list[DeadJob] = []
        self.matched = 0  # copies the last scan's selection matched
        self.truncated = False
        self.broker_version = _server_version(connection)

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[ErrorQueue]:
        names = Names(settings.namespace)
        connection = await connect_plain(settings.amqp, role="errors")
        try:
            channel = await connection.channel(publisher_confirms=False)
            try:
                queue = await channel.declare_queue(names.errors, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise ErrorQueueMissing(
                    f"namespace {settings.namespace!r} has no error queue {names.errors!r}: is "
                    "the namespace right (--namespace, the namespace setting or "
                    "$MODELFLEET_NAMESPACE)? The first controller, worker or client creates it"
                ) from None
            reader = cls(settings, connection, channel, queue)
            try:
                yield reader
            finally:
                await reader.release()
        finally:
            await connection.close()

    async def scan(
        self, selection: Selection | None = None, *, max_scan: int = DEFAULT_MAX_SCAN
    ) -> list[DeadJob]:
        """Fetch copies (held, not acknowledged) until the queue is empty or ``max_scan`` were
        fetched; returns those matching ``selection``, in the order read.

        Raises :class:`JobIdError` unless every JOB_ID of the selection names exactly one job
        among the copies read. Always reads to the end, so that every command sees the same
        copies (a prefix is unique among all of them, not among the first few).
        """
        self.truncated = True
        while len(self.held) < max_scan:
            message = await self.queue.get(no_ack=False, fail=False)
            if message is None:
                self.truncated = False
                break
            self.held.append(DeadJob.of(message, self.names))
        if selection is not None and selection.job_ids:
            match = match_job_ids(selection.job_ids, (job.job_id for job in self.held))
            if not match.ok:
                raise JobIdError(
                    match, self.names.errors, truncated_at=max_scan if self.truncated else None
                )
            selection = Selection(
                job_ids=frozenset(match.resolved.values()),
                everything=selection.everything,
                model=selection.model,
                reason=selection.reason,
            )
        chosen = [job for job in self.held if selection is None or selection.matches(job)]
        self.matched = len(chosen)
        return chosen

    async def remove(self, job: DeadJob) -> None:
        """Delete one held copy from the queue (acknowledge it)."""
        await job.message.ack()
        self.held.remove(job)

    async def release(self) -> None:
        """Hand every copy still held back to the broker (close the reading channel)."""
        if self.channel.is_closed:
            return
        # A channel or connection that died has had its copies taken back by the broker.
        with contextlib.suppress(aiormq.exceptions.AMQPError, OSError, RuntimeError):
            await self.channel.close()

    def copies_of(self, job_id: str) -> list[DeadJob]:
        return [job for job in self.held if job.job_id == job_id]

    @property
    def most_returned(self) -> int:
        """The broker's highest return count among the copies read (for the warning only)."""
        return max((job.broker_returns for job in self.held), default=0)

    def warning(self) -> str | None:
        return returns_warning(self.broker_version, self.most_returned, self.names.errors)


# -- operations (the CLI's and the tests' entry points) --------------------------------------


async def list_errors(
    settings: Settings,
    selection: Selection | None = None,
    *,
    limit: int | None = DEFAULT_LIMIT,
    max_scan: int = DEFAULT_MAX_SCAN,
    newest_first: bool = False,
) -> tuple[list[DeadJob], ErrorQueue]:
    """The first ``limit`` copies matching ``selection`` (every copy when None) by the time
    they died, oldest first unless ``newest_first``; all left in the queue.
    ``errors.matched`` says how many matched in all."""
    async with ErrorQueue.open(settings) as errors:
        jobs = order_by_age(
            await errors.scan(selection, max_scan=max_scan), newest_first=newest_first
        )
    return (jobs if limit is None else jobs[:limit]), errors


async def show_error(
    settings: Settings, job_id: str, *, max_scan: int = DEFAULT_MAX_SCAN
) -> list[DeadJob]:
    """Every copy of one job (usually one), all left in the queue. ``job_id`` may be a unique
    prefix; raises :class:`JobIdError` when it names no job or several."""
    async with ErrorQueue.open(settings) as errors:
        return await errors.scan(Selection(job_ids=frozenset({job_id})), max_scan=max_scan)


@dataclass
class Answer:
    """What came back for a replayed job under ``--wait``."""

    status: str  # "ok", "failed" or "no_answer"
    error: str | None = None  # the code name of a failure (WORKER_ERROR, NO_WORKER, ...)
    code: int | None = None
    message: str | None = None
    seconds: float | None = None  # from the publish to the answer


@dataclass
class NotReplayed:
    """A chosen job that was not published again (it stays in the error queue)."""

    job: DeadJob
    error: str  # a console/job error name: INVALID_MODEL, OVERLOADED, BROKER_ERROR
    message: str


@dataclass
class ReplayOutcome:
    replayed: list[DeadJob] = field(default_factory=list)
    failed: list[NotReplayed] = field(default_factory=list)
    removed: int = 0  # copies deleted from the error queue (a job may have several)
    # job id -> where its answer goes: a reply-to address, or None (nobody)
    answer_to: dict[str, str | None] = field(default_factory=dict)
    answers: dict[str, Answer] = field(default_factory=dict)  # --wait only
    waited_s: float | None = None


def replay_message(
    job: DeadJob,
    *,
    timeout_s: float,
    keep_reply_to: bool,
    now: float | None = None,
    reply_to: str | None = None,
) -> aio_pika.Message:
    """The job as it is published again: same id and body, a fresh deadline, clean headers.
    ``reply_to`` (this command's own reply path) replaces the original one and makes the job's
    id its correlation id, so the answer can be matched."""
    source = job.message
    now = time.time() if now is None else now
    deadline = now + timeout_s
    # Ours rebuilt, every other x-mf-* dropped; integer epoch milliseconds, as the client sends.
    headers = replay_headers(
        source.headers, replayed=job.replayed, deadline_ms=round(deadline * 1000)
    )
    body = source.body
    parsed = parse_body(body)  # depth-limited: never a RecursionError
    decoded = parsed.value if parsed.format == "json" else None
    if isinstance(decoded, dict):
        decoded["deadline"] = deadline
        decoded["sent_at"] = now
        body = json.dumps(decoded, separators=(",", ":")).encode()
    if reply_to is not None:
        answer_to: str | None = reply_to
        correlation_id = job.job_id
    else:
        answer_to = source.reply_to if keep_reply_to else None
        correlation_id = source.correlation_id or job.job_id
    return aio_pika.Message(
        body,
        headers=headers,
        content_type=source.content_type or "application/json",
        content_encoding=source.content_encoding,
        message_id=job.job_id,
        correlation_id=correlation_id,
        reply_to=answer_to,
        expiration=max(timeout_s, 0.001),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        timestamp=now,
        type="job",
    )


class _Replies:
    """Answers to replayed jobs on the replaying channel's direct reply-to, by correlation id
    (the job id: see :func:`replay_message`). Chunks of streamed jobs are skipped."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[ResultReply | ErrorReply]] = {}
        self.sent_at: dict[str, float] = {}
        self.took: dict[str, float] = {}

    async def listen(self, channel: AbstractChannel) -> None:
        # The consumer must exist before the first publish naming amq.rabbitmq.reply-to.
        queue = await channel.declare_queue(DIRECT_REPLY_TO, passive=True)
        await queue.consume(self._on_reply, no_ack=True)

    def expect(self, job_id: str) -> None:
        self.waiting[job_id] = asyncio.get_running_loop().create_future()
        self.sent_at[job_id] = time.monotonic()

    def forget(self, job_id: str) -> None:
        self.waiting.pop(job_id).cancel()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        job_id = message.correlation_id or ""
        future = self.waiting.get(job_id)
        if future is None or future.done():
            return
        try:
            reply = parse_reply(message.body)
        except ValidationError:
            return  # not an answer modelfleet sends: keep waiting for one
        if isinstance(reply, (ResultReply, ErrorReply)):
            self.took[job_id] = round(time.monotonic() - self.sent_at[job_id], 3)
            future.set_result(reply)

    async def collect(self, wait_s: float) -> dict[str, Answer]:
        """Wait up to ``wait_s`` for every answer; what each job answered, or no_answer."""
        pending = list(self.waiting.values())
        if pending:
            await asyncio.wait(pending, timeout=wait_s)
        answers: dict[str, Answer] = {}
        for job_id, future in self.waiting.items():
            if not future.done():
                future.cancel()
                answers[job_id] = Answer("no_answer")
                continue
            reply = future.result()
            took = self.took.get(job_id)
            if isinstance(reply, ErrorReply):
                answers[job_id] = Answer("failed", reply.error, reply.code, reply.message, took)
            else:
                answers[job_id] = Answer("ok", seconds=took)
        return answers


async def replay_errors(
    settings: Settings,
    selection: Selection,
    *,
    timeout_s: float | None = None,
    keep_reply_to: bool = False,
    wait: bool = False,
    max_scan: int = DEFAULT_MAX_SCAN,
) -> ReplayOutcome:
    """Publish the chosen jobs to ``{ns}.jobs`` again and remove them from the error queue.

    A job with several copies is published once and every copy is removed. A job the broker
    does not confirm (its model queue is full, say) stays in the error queue. ``wait``: the jobs
    carry this command's direct reply-to, and after publishing (and handing back the copies not
    replayed) it waits until each answers or the new deadline (plus WAIT_GRACE_S) passes.
    """
    if wait and keep_reply_to:
        raise ValueError("wait and keep_reply_to exclude each other: an answer goes one way")
    timeout = settings.client.timeout_s if timeout_s is None else timeout_s
    outcome = ReplayOutcome()
    replies = _Replies() if wait else None
    async with ErrorQueue.open(settings) as errors:
        chosen = order_by_age(await errors.scan(selection, max_scan=max_scan))
        if not chosen:
            return outcome
        publisher = await errors.connection.channel(publisher_confirms=True)
        try:
            jobs_exchange = await publisher.get_exchange(errors.names.jobs)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise BrokerError(
                f"exchange {errors.names.jobs!r} does not exist: start a controller first"
            ) from None
        if replies is not None:
            await replies.listen(publisher)
        done: set[str] = set()
        for job in chosen:
            if job.job_id in done:
                continue
            if job.problem is not None:
                # Skipped, said, left in the queue: it does not stop the jobs after it.
                outcome.failed.append(
                    NotReplayed(job, ErrorCode.INVALID_JOB.name, f"broken entry: {job.problem}")
                )
                continue
            try:
                check_model_name(job.model)
            except ValueError as exc:
                outcome.failed.append(
                    NotReplayed(job, ErrorCode.INVALID_MODEL.name, f"cannot tell its model: {exc}")
                )
                continue
            try:
                message = replay_message(
                    job,
                    timeout_s=timeout,
                    keep_reply_to=keep_reply_to,
                    reply_to=DIRECT_REPLY_TO if replies is not None else None,
                )
            except (ValueError, TypeError, OverflowError, RecursionError) as exc:
                outcome.failed.append(
                    NotReplayed(
                        job,
                        ErrorCode.INVALID_JOB.name,
                        f"broken entry: cannot rebuild it ({type(exc).__name__})",
                    )
                )
                continue
            if replies is not None:
                replies.expect(job.job_id)
            try:
                async with asyncio.timeout(settings.amqp.connect_timeout_s):
                    await jobs_exchange.publish(message, routing_key=job.model, mandatory=False)
            except aio_pika.exceptions.DeliveryError:
                outcome.failed.append(
                    NotReplayed(
                        job,
                        ErrorCode.OVERLOADED.name,
                        "refused by the broker (is the model's queue full?)",
                    )
                )
                if replies is not None:
                    replies.forget(job.job_id)
                continue
            except TimeoutError:
                outcome.failed.append(
                    NotReplayed(
                        job, console.BROKER_ERROR, "the broker did not confirm the publish in time"
                    )
                )
                if replies is not None:
                    replies.forget(job.job_id)
                continue
            done.add(job.job_id)
            outcome.replayed.append(job)
            outcome.answer_to[job.job_id] = message.reply_to
            for copy in errors.copies_of(job.job_id):
                await errors.remove(copy)
                outcome.removed += 1
        if replies is not None:
            # Nobody else should wait for the copies not replayed while we wait for answers.
            await errors.release()
            outcome.waited_s = timeout + WAIT_GRACE_S
            outcome.answers = await replies.collect(outcome.waited_s)
        await publisher.close()
    return outcome


async def purge_errors(
    settings: Settings,
    selection: Selection,
    *,
    confirm: Callable[[list[DeadJob]], bool | Awaitable[bool]] | None = None,
    max_scan: int = DEFAULT_MAX_SCAN,
    skipped: list[DeadJob] | None = None,
) -> list[DeadJob]:
    """Delete the chosen copies; ``confirm`` (when given) sees them first and may say no.

    Unless the selection names job ids, broken entries (:attr:`DeadJob.problem`) are not
    deleted but left in the queue and appended to ``skipped``: naming one deletes it."""
    async with ErrorQueue.open(settings) as errors:
        chosen = order_by_age(await errors.scan(selection, max_scan=max_scan))
        if not selection.job_ids:
            broken = [job for job in chosen if job.problem is not None]
            chosen = [job for job in chosen if job.problem is None]
            if skipped is not None:
                skipped.extend(broken)
        if not chosen:
            return []
        if confirm is not None:
            answer = confirm(chosen)
            if inspect.isawaitable(answer):
                answer = await answer
            if not answer:
                return []
        for job in chosen:
            await errors.remove(job)
    return chosen


# -- command line ----------------------------------------------------------------------------


def add_errors_parser(
    commands: argparse._SubParsersAction[Any],
    common: argparse.ArgumentParser,
) -> None:
    """``modelfleet errors list|show|replay|purge`` (called by :mod:`modelfleet.cli`; the
    actions' parsers are of the class ``commands`` makes, so usage errors look the same)."""
    errors = commands.add_parser(
        "errors",
        parents=[common],
        help="inspect the error queue; replay or purge failed jobs",
        description="Inspect the error queue {ns}.errors; replay failed jobs or purge them.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = errors.add_subparsers(
        dest="errors_command",
        required=True,
        metavar="ACTION",
        help="what to do (`modelfleet errors ACTION --help` for its options)",
    )
    scan = argparse.ArgumentParser(add_help=False)
    scan.add_argument(
        "--max-scan",
        type=int,
        default=DEFAULT_MAX_SCAN,
        metavar="N",
        help=f"read at most N copies of the queue (default {DEFAULT_MAX_SCAN})",
    )
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--model", metavar="M", help="only jobs of model M")
    filters.add_argument(
        "--reason",
        metavar="R",
        choices=KNOWN_REASONS,
        help=f"only jobs dead for reason R: {', '.join(KNOWN_REASONS)}",
    )
    ids_help = (
        f"a job id, or its first {MIN_PREFIX}+ characters when they name exactly one job "
        "(repeatable)"
    )

    listing = actions.add_parser(
        "list",
        parents=[common, scan, filters],
        help="a table of the jobs in the error queue, oldest death first",
        description="A table of the jobs in the error queue, by the time each died, oldest "
        "first. Listing changes nothing: the same jobs, the same columns every time.",
    )
    listing.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"show at most N jobs (default {DEFAULT_LIMIT})",
    )
    listing.add_argument(
        "--newest-first",
        action="store_true",
        help="the jobs that died last first (default: oldest first)",
    )

    show = actions.add_parser(
        "show",
        parents=[common, scan],
        help="everything about one job: headers, properties, body",
        description="Everything about one job in the error queue: why and when it died, its "
        "AMQP properties, headers and body.",
    )
    show.add_argument(
        "job_id",
        metavar="JOB_ID",
        help=f"the job's id, or its first {MIN_PREFIX}+ characters when they name one job",
    )

    replay = actions.add_parser(
        "replay",
        parents=[common, scan, filters],
        help="publish chosen jobs to their model again and remove them from the error queue",
        description="Publish the chosen jobs to their model again (same job id, fresh deadline) "
        "and remove them from the error queue. Says where each answer goes; --wait waits for "
        "the answers here and exits 1 if any job failed again or did not answer.",
    )
    replay.add_argument("job_ids", nargs="*", metavar="JOB_ID", help=ids_help)
    replay.add_argument("--all", action="store_true", help="every job (narrowed by the filters)")
    replay.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="the replayed jobs' new deadline in seconds (default: client.timeout_s)",
    )
    replay.add_argument(
        "--keep-reply-to",
        action="store_true",
        help="answer the original reply-to address (default: dropped, its producer is gone)",
    )
    replay.add_argument(
        "--wait",
        action="store_true",
        help="wait here for each replayed job's answer, until its new deadline (--timeout) "
        "passes, and print ok, failed again (CODE: message) or no answer",
    )

    purge = actions.add_parser(
        "purge",
        parents=[common, scan, filters],
        help="delete chosen jobs from the error queue",
        description="Delete the chosen jobs from the error queue, for good.",
    )
    purge.add_argument("job_ids", nargs="*", metavar="JOB_ID", help=ids_help)
    purge.add_argument("--all", action="store_true", help="every job (narrowed by the filters)")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")


_EPILOG = f"""\
JOB_ID: a whole job id, or its first {MIN_PREFIX} or more characters when they name exactly one
job (an ambiguous prefix is refused with the candidates listed).

`list` orders jobs by the time they died, oldest first (--newest-first turns it round): the
broker's x-death time, else when the job was sent. REPLAYED counts how often `errors replay`
already sent a job back (its x-mf-replayed header).

The queue is read with basic.get without acknowledging, on one channel; closing it (or the
command dying) hands every copy not replayed or purged back to the broker, so nothing is lost.
Meanwhile other readers do not see those copies. The broker counts each hand-back in the copy's
x-delivery-count, so that count says more about listings than about the job: it is not shown.
RabbitMQ 3.x sets no delivery limit on the error queue, and 4.3 counts failed deliveries only;
RabbitMQ 4.0-4.2 default to 20 returns for quorum queues and would drop a copy listed that
often: `list` warns there, and a policy lifts the limit, for example
  rabbitmqctl set_policy mf-errors '^NS\\.errors$' '{{"delivery-limit":-1}}' \\
      --apply-to quorum_queues

`replay` prints each job's outcome once, on stdout; when a job was not replayed, or under
--wait failed again or did not answer, it ends with one REPLAY_FAILED line on stderr that
counts them.

Exit codes: 0 done; 1 nothing matched (NOT_FOUND), a job was not replayed, or under --wait a
replayed job failed again or did not answer (REPLAY_FAILED); 2 bad usage (an ambiguous or
short prefix, an unknown --reason); 3 RabbitMQ unreachable or refusing (BROKER_ERROR).
"""


def format_age(age_s: float | None) -> str:
    if age_s is None:
        return "-"
    if age_s < 60:
        return f"{age_s:.1f}s"
    if age_s < 3600:
        return f"{age_s / 60:.0f}m"
    if age_s < 86400:
        return f"{age_s / 3600:.1f}h"
    return f"{age_s / 86400:.1f}d"


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(jobs: Sequence[DeadJob], now: float | None = None) -> str:
    headers = ["JOB_ID", "MODEL", "REASON", "AGE", "REPLAYED", "ERROR"]
    rows = [
        [
            escape_control(j.job_id),
            escape_control(j.model),
            escape_control(j.reason),
            format_age(j.age_s(now)),
            str(j.replayed),
            escape_control(
                _shorten(f"BROKEN ({j.problem}): {j.error}" if j.problem else j.error, 70)
            ),
        ]
        for j in jobs
    ]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _died(job: DeadJob) -> str:
    if job.died_at is None:
        return "unknown (the copy records neither its death nor when it was sent)"
    when = datetime.fromtimestamp(job.died_at, tz=UTC).isoformat(timespec="seconds")
    ago = f"{format_age(job.age_s())} ago"
    if job.died_at_source == "sent":
        return f"after {when}, when it was sent ({ago}; the time of death is not recorded)"
    return f"{when} ({ago}; from {job.died_at_source})"


def render_details(copies: Sequence[DeadJob], queue: str) -> str:
    parts: list[str] = []
    for index, job in enumerate(copies, start=1):
        d = job.details()
        title = f"job {escape_control(job.job_id)}"
        if len(copies) > 1:
            title += f" (copy {index} of {len(copies)})"
        lines = [
            f"{title} in {queue}",
            f"  model:     {d['model']}",
            f"  reason:    {d['reason']}",
            f"  died:      {_died(job)}",
            f"  replayed:  {d['replayed']} time(s) before (x-mf-replayed)",
            f"  error:     {d['error']}",
            *([f"  broken:    {job.problem}"] if job.problem else []),
            "properties:",
            *(f"  {k}: {v}" for k, v in d["properties"].items()),
            "headers:",
            *(
                f"  {k}: {json.dumps(v, ensure_ascii=False, default=str)}"
                for k, v in d["headers"].items()
            ),
            f"body ({d['body_format']}, {d['body_bytes']} bytes):",
        ]
        if d["body_format"] == "json":
            body = json.dumps(d["body"], indent=2, ensure_ascii=False, default=str)
        else:
            body = d["body"]
        # Every line escaped (json.dumps leaves C1 controls and separators as they are); a
        # text body's own line breaks are kept as lines, the rest shown as escapes.
        lines = [escape_control(line) for line in lines]
        lines += ["  " + escape_control(line) for line in body.split("\n") or [""]]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _selection(args: argparse.Namespace) -> Selection:
    return Selection(
        job_ids=frozenset(getattr(args, "job_ids", None) or ()),
        everything=bool(getattr(args, "all", False)),
        model=args.model,
        reason=args.reason,
    )


async def _confirm_on_tty(jobs: list[DeadJob]) -> bool:
    print(render_table(jobs))
    prompt = f"Delete these {len(jobs)} job copies from the error queue for good? [y/N] "
    answer = await asyncio.to_thread(input, prompt)
    return answer.strip().lower() in ("y", "yes")


async def run_errors(settings: Settings, args: argparse.Namespace) -> int:
    """Run one ``modelfleet errors ...`` command; returns the exit code. Every failure is
    printed through :func:`modelfleet.console.report_error`."""
    json_mode = bool(getattr(args, "json", False))
    names = Names(settings.namespace)
    try:
        return await _run_action(settings, args, json_mode)
    except JobIdError as exc:
        report_error(exc.error, str(exc), json_mode=json_mode, queue=exc.queue)
        return EXIT_USAGE if exc.error == console.USAGE else EXIT_FAILED
    except ErrorQueueMissing as exc:
        report_error(console.NOT_FOUND, str(exc), json_mode=json_mode, namespace=names.ns)
        return EXIT_FAILED
    except BrokerError as exc:
        report_error(console.BROKER_ERROR, str(exc), json_mode=json_mode)
        return EXIT_BROKER
    except (aiormq.exceptions.AMQPError, OSError) as exc:
        # The connection or a channel failed mid-command: whatever was held goes back.
        reason = str(exc) or type(exc).__name__
        report_error(
            console.BROKER_ERROR,
            f"RabbitMQ failed during `errors {args.errors_command}`: {reason}; copies not "
            f"removed are back in {names.errors}",
            json_mode=json_mode,
        )
        return EXIT_BROKER


def _usage(text: str, json_mode: bool) -> int:
    report_error(console.USAGE, text, json_mode=json_mode)
    return EXIT_USAGE


def _nothing_matched(names: Names, json_mode: bool) -> int:
    report_error(
        console.NOT_FOUND,
        f"no job in {names.errors} matched",
        json_mode=json_mode,
        queue=names.errors,
    )
    return EXIT_FAILED


async def _run_action(settings: Settings, args: argparse.Namespace, json_mode: bool) -> int:
    action: str = args.errors_command
    if args.max_scan < 1:
        return _usage("--max-scan must be at least 1", json_mode)
    if action == "list":
        return await _run_list(settings, args, json_mode)
    if action == "show":
        return await _run_show(settings, args, json_mode)
    selection = _selection(args)
    if selection.chooses_nothing:
        return _usage(
            f"errors {action}: name JOB_IDs, or pass --all (optionally --model/--reason)",
            json_mode,
        )
    if action == "replay":
        return await _run_replay(settings, args, selection, json_mode)
    if action == "purge":
        return await _run_purge(settings, args, selection, json_mode)
    raise AssertionError(f"unknown errors action {action}")


async def _run_list(settings: Settings, args: argparse.Namespace, json_mode: bool) -> int:
    names = Names(settings.namespace)
    if args.limit < 1:
        return _usage("--limit must be at least 1", json_mode)
    selection = Selection(everything=True, model=args.model, reason=args.reason)
    jobs, errors = await list_errors(
        settings,
        selection,
        limit=args.limit,
        max_scan=args.max_scan,
        newest_first=args.newest_first,
    )
    now = time.time()
    order = "newest first" if args.newest_first else "oldest first"
    warning = errors.warning()
    if json_mode:
        version = errors.broker_version
        document = {
            "queue": names.errors,
            "order": order.replace(" ", "_"),
            "in_queue": errors.in_queue,
            "matched": errors.matched,
            "truncated": errors.truncated,
            "broker_version": ".".join(map(str, version)) if version else None,
            "warnings": [warning] if warning else [],
            "jobs": [j.summary(now) for j in jobs],
        }
        print(json.dumps(document, indent=2))
    else:
        print(render_table(jobs, now))
        print(
            f"\n{len(jobs)} shown of {errors.matched} matching, by time of death, {order}; "
            f"{errors.in_queue} in {names.errors}"
        )
    if errors.truncated:
        print(f"note: only the first {args.max_scan} copies were read", file=sys.stderr)
    if warning:
        print(warning, file=sys.stderr)
    return EXIT_OK


async def _run_show(settings: Settings, args: argparse.Namespace, json_mode: bool) -> int:
    names = Names(settings.namespace)
    # At least one copy: the id was resolved among the copies read (else JobIdError).
    copies = await show_error(settings, args.job_id, max_scan=args.max_scan)
    if json_mode:
        print(json.dumps([c.details() for c in copies], indent=2, default=str))
    else:
        print(render_details(copies, names.errors))
    return EXIT_OK


def _answer_goes(outcome: ReplayOutcome, job: DeadJob, keep_reply_to: bool) -> str:
    target = outcome.answer_to.get(job.job_id)
    if keep_reply_to:
        if target:
            return (
                f"its answer goes to {target} (the original producer's reply-to, --keep-reply-to)"
            )
        return "its answer goes nowhere: the job had no reply-to to keep"
    return (
        "its answer goes nowhere: the original producer is gone "
        "(--wait waits for it here, --keep-reply-to sends it to the original reply-to)"
    )


async def _run_replay(
    settings: Settings, args: argparse.Namespace, selection: Selection, json_mode: bool
) -> int:
    names = Names(settings.namespace)
    if args.timeout is not None and args.timeout <= 0:
        return _usage("--timeout must be positive", json_mode)
    if args.wait and args.keep_reply_to:
        return _usage(
            "--wait and --keep-reply-to exclude each other: an answer goes to one place", json_mode
        )
    outcome = await replay_errors(
        settings,
        selection,
        timeout_s=args.timeout,
        keep_reply_to=args.keep_reply_to,
        wait=args.wait,
        max_scan=args.max_scan,
    )
    if not outcome.replayed and not outcome.failed:
        return _nothing_matched(names, json_mode)
    timeout = settings.client.timeout_s if args.timeout is None else args.timeout
    waited = f"{outcome.waited_s:g}s" if outcome.waited_s is not None else "the wait"
    # Each job's outcome is said once, on stdout (a line, or a record of the JSON document);
    # what went wrong is summed up in one failure line on stderr at the end (replay_failure).
    records: list[dict[str, Any]] = []
    for job in outcome.replayed:
        record: dict[str, Any] = {
            "job_id": job.job_id,
            "model": job.model,
            "was": job.reason,
            "as_job": job.job_id,
            "answer_to": outcome.answer_to.get(job.job_id),
        }
        head = f"replayed {job.job_id} to model {job.model} as job {job.job_id} (was {job.reason})"
        answer = outcome.answers.get(job.job_id)
        if answer is None:
            line = f"{head}; {_answer_goes(outcome, job, args.keep_reply_to)}"
        else:
            record.update(
                outcome=answer.status,
                error=answer.error,
                code=answer.code,
                message=answer.message,
                seconds=answer.seconds,
            )
            if answer.status == "ok":
                took = f" in {answer.seconds:g}s" if answer.seconds is not None else ""
                line = f"{head}: answered (ok){took}"
            elif answer.status == "failed":
                error = answer.error or ErrorCode.WORKER_ERROR.name
                line = f"{head}: failed again with {error}: {answer.message}"
            else:
                line = (
                    f"{head}: no answer within {waited} (its {timeout:g}s deadline and "
                    f"{WAIT_GRACE_S:g}s more); it may still be queued or running, or have died "
                    f"again into {names.errors}"
                )
        if not json_mode:
            print(escape_control(line))
        records.append(record)
    if not json_mode:
        for refused in outcome.failed:
            job = refused.job
            print(
                escape_control(
                    f"not replayed {job.job_id} (model {job.model}, was {job.reason}): "
                    f"{refused.error}: {refused.message}; left in {names.errors}"
                )
            )
    if json_mode:
        document = {
            "queue": names.errors,
            "exchange": names.jobs,
            "deadline_s": timeout,
            "waited_s": outcome.waited_s,
            "removed": outcome.removed,
            "replayed": records,
            "not_replayed": [
                {
                    "job_id": r.job.job_id,
                    "model": r.job.model,
                    "was": r.job.reason,
                    "error": r.error,
                    "message": r.message,
                }
                for r in outcome.failed
            ],
        }
        print(json.dumps(document, indent=2))
    else:
        summary = (
            f"{len(outcome.replayed)} job(s) replayed to {names.jobs} with a {timeout:g}s "
            f"deadline; {outcome.removed} copy(ies) removed from {names.errors}"
        )
        if outcome.failed:
            summary += f"; {len(outcome.failed)} not replayed, left there"
        if args.wait:
            statuses = [a.status for a in outcome.answers.values()]
            summary += (
                f"; answered ok {statuses.count('ok')}, failed again "
                f"{statuses.count('failed')}, no answer {statuses.count('no_answer')}"
            )
        print(summary, flush=True)
    statuses = [a.status for a in outcome.answers.values()]
    failure = replay_failure(
        replayed=len(outcome.replayed),
        not_replayed=len(outcome.failed),
        failed_again=statuses.count("failed"),
        no_answer=statuses.count("no_answer"),
        waited_s=outcome.waited_s,
        queue=names.errors,
    )
    if failure is None:
        return EXIT_OK
    report_error(REPLAY_FAILED, failure, json_mode=json_mode)
    return EXIT_FAILED


async def _run_purge(
    settings: Settings, args: argparse.Namespace, selection: Selection, json_mode: bool
) -> int:
    names = Names(settings.namespace)
    confirm: Callable[[list[DeadJob]], bool | Awaitable[bool]] | None = None
    if not args.yes:
        if not sys.stdin.isatty():
            return _usage(
                "errors purge: stdin is not a terminal to confirm on; pass --yes", json_mode
            )
        confirm = _confirm_on_tty
    asked: list[int] = []

    def counted(jobs: list[DeadJob]) -> bool | Awaitable[bool]:
        asked.append(len(jobs))
        assert confirm is not None
        return confirm(jobs)

    skipped: list[DeadJob] = []
    purged = await purge_errors(
        settings,
        selection,
        confirm=counted if confirm else None,
        max_scan=args.max_scan,
        skipped=skipped,
    )
    if not purged and not asked and not skipped:
        return _nothing_matched(names, json_mode)
    if json_mode:
        jobs = [{"job_id": j.job_id, "model": j.model, "reason": j.reason} for j in purged]
        document = {
            "queue": names.errors,
            "purged": jobs,
            "skipped": [
                {"job_id": j.job_id, "model": j.model, "reason": j.reason, "problem": j.problem}
                for j in skipped
            ],
        }
        print(json.dumps(document, indent=2))
    else:
        for job in purged:
            print(escape_control(f"purged {job.job_id} (model {job.model}, {job.reason})"))
        for job in skipped:
            print(
                escape_control(
                    f"skipped {job.job_id} (model {job.model}, {job.reason}): broken entry: "
                    f"{job.problem}; left in {names.errors} (purge it by its id)"
                )
            )
        print(f"{len(purged)} job copy(ies) purged from {names.errors}")
    if skipped:
        report_error(
            PURGE_SKIPPED,
            f"{len(skipped)} broken {_jobs(len(skipped))} skipped, left in {names.errors}; "
            "name them to purge them",
            json_mode=json_mode,
        )
        return EXIT_FAILED
    return EXIT_OK if purged else EXIT_FAILED  # declined at the prompt: nothing done
