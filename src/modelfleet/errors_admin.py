"""``modelfleet errors list|show|replay|purge``: the error queue ``{ns}.errors``, for people.

Every job that failed for good is kept in ``{ns}.errors`` with its reason (``x-mf-reason`` or
the broker's ``x-death``), its model and, for failures modelfleet saw, the error text
(``x-mf-error``). These commands read it, send chosen jobs back to their model, or delete them.

How the queue is read without losing anything: AMQP 0-9-1 has no "browse" for a quorum queue,
so the copies are fetched with ``basic.get`` *without* acknowledging them, all on one channel.
The ones a command removes (replayed or purged) are acknowledged; closing the channel then hands
every other one back to the broker, which puts it back in the queue. Caveats:

* While a command runs, the copies it holds are invisible to anybody else reading the queue (a
  second ``errors list`` at the same moment sees fewer).
* Each hand-back counts as a delivery: the copy's ``x-delivery-count`` header grows by one per
  listing (shown as RETURNED). The error queue has no delivery limit on RabbitMQ 3.x, so nothing
  is lost; RabbitMQ 4.0-4.2 gives every quorum queue a default limit of 20 and would *drop* a
  copy listed that many times: there, lift it with a policy, e.g.
  ``rabbitmqctl set_policy mf-errors '^NS\\.errors$' '{"delivery-limit":-1}'
  --apply-to quorum_queues``.
* Order: handed-back copies go behind the ones nobody held (RabbitMQ 3.10). Every command
  therefore reads the whole queue (up to ``--max-scan`` copies; ``list --limit`` only limits
  what is printed), so the order stays as it was, minus what was removed. When the queue holds
  more than ``--max-scan`` copies, or somebody else reads it at the same time, the copies read
  move behind the rest. Do not rely on the order: select jobs by id, model or reason.

A replayed job is a new publish to ``{ns}.jobs`` with the model as routing key, the same job id
and a fresh deadline (expiration, ``x-mf-deadline`` and the body's ``deadline``). Its
``reply_to`` is dropped, because the producer that waited for it is gone, unless
``--keep-reply-to``. It is published with a publisher confirm first and removed from the error
queue after, so a crash in between leaves it in both places (never in neither).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from modelfleet.config import Settings
from modelfleet.connections import connect_plain
from modelfleet.errors import BrokerError
from modelfleet.messages import check_model_name
from modelfleet.topology import (
    DEADLINE_HEADER,
    ERROR_HEADER,
    MODEL_HEADER,
    REASON_HEADER,
    DeadReason,
    Names,
    dead_reason,
)

__all__ = [
    "DeadJob",
    "ErrorQueue",
    "ReplayOutcome",
    "Selection",
    "add_errors_parser",
    "list_errors",
    "purge_errors",
    "replay_errors",
    "run_errors",
    "show_error",
]

# Headers a replay drops: the record of the last death (a new one gets its own) and ours.
REPLAYED_HEADER = "x-mf-replayed"
_DEATH_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-delivery-count",
        REASON_HEADER,
        ERROR_HEADER,
        MODEL_HEADER,
        "x-mf-rerouted",
    }
)
DEFAULT_LIMIT = 100
DEFAULT_MAX_SCAN = 100_000
# A copy handed back this often is worth a warning (RabbitMQ 4.0-4.2 drop it at 20).
RETURNS_WARNING = 10
_KNOWN_REASONS = (
    DeadReason.NO_WORKER,
    DeadReason.WORKER_ERROR,
    DeadReason.INVALID,
    DeadReason.EXPIRED,
    DeadReason.DELIVERY_LIMIT,
    DeadReason.OVERLOADED,
    DeadReason.REJECTED,
)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def _jsonable(value: Any) -> Any:
    """AMQP table values (bytes, datetime, Decimal, nested tables) as JSON-friendly values."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@dataclass
class DeadJob:
    """One copy in the error queue, still held (unacknowledged) by the reader that got it."""

    message: AbstractIncomingMessage = field(repr=False)
    job_id: str
    model: str
    reason: str
    error: str
    timestamp: float | None
    returned: int

    @classmethod
    def of(cls, message: AbstractIncomingMessage, names: Names) -> DeadJob:
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
        stamp = message.timestamp
        return cls(
            message=message,
            job_id=message.message_id or message.correlation_id or "?",
            model=model,
            reason=reason,
            error=error,
            timestamp=stamp.timestamp() if isinstance(stamp, datetime) else None,
            returned=count if isinstance(count, int) else 0,
        )

    def age_s(self, now: float | None = None) -> float | None:
        if self.timestamp is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.timestamp)

    def summary(self, now: float | None = None) -> dict[str, Any]:
        age = self.age_s(now)
        return {
            "job_id": self.job_id,
            "model": self.model,
            "reason": self.reason,
            "age_s": None if age is None else round(age, 3),
            "error": self.error,
            "returned": self.returned,
        }

    def details(self, now: float | None = None) -> dict[str, Any]:
        """Everything about the copy: summary, AMQP properties, headers, decoded body."""
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
        body: Any
        try:
            body = json.loads(m.body)
            body_format = "json"
        except (ValueError, UnicodeDecodeError):
            body = m.body.decode(errors="replace")
            body_format = "text"
        return {
            **self.summary(now),
            "properties": {k: v for k, v in properties.items() if v not in (None, "")},
            "headers": _jsonable(dict(m.headers or {})),
            "body_format": body_format,
            "body_bytes": len(m.body),
            "body": body,
        }


@dataclass(frozen=True)
class Selection:
    """Which copies a command acts on: given job ids (all when none), narrowed by model/reason."""

    job_ids: frozenset[str] = frozenset()
    everything: bool = False
    model: str | None = None
    reason: str | None = None

    @property
    def chooses_nothing(self) -> bool:
        """True unless it names jobs, says ``--all``, or filters by model or reason."""
        return not (self.job_ids or self.everything or self.model or self.reason)

    def matches(self, job: DeadJob) -> bool:
        if self.job_ids and job.job_id not in self.job_ids:
            return False
        if self.model is not None and job.model != self.model:
            return False
        return self.reason is None or job.reason == self.reason


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
                raise BrokerError(
                    f"there is no error queue {names.errors!r}: is the namespace right? "
                    "(it is created by the first controller, worker or client)"
                ) from None
            reader = cls(settings, connection, channel, queue)
            try:
                yield reader
            finally:
                # Every copy not acknowledged goes back to the queue when its channel closes.
                if not channel.is_closed:
                    await channel.close()
        finally:
            await connection.close()

    async def scan(
        self, selection: Selection | None = None, *, max_scan: int = DEFAULT_MAX_SCAN
    ) -> list[DeadJob]:
        """Fetch copies (held, not acknowledged) until the queue is empty or ``max_scan`` were
        fetched; returns those matching ``selection``.

        Always to the end: copies handed back go behind those never fetched, so stopping early
        would rotate the queue.
        """
        chosen: list[DeadJob] = []
        self.truncated = True
        while len(self.held) < max_scan:
            message = await self.queue.get(no_ack=False, fail=False)
            if message is None:
                self.truncated = False
                break
            job = DeadJob.of(message, self.names)
            self.held.append(job)
            if selection is None or selection.matches(job):
                chosen.append(job)
        self.matched = len(chosen)
        return chosen

    async def remove(self, job: DeadJob) -> None:
        """Delete one held copy from the queue (acknowledge it)."""
        await job.message.ack()
        self.held.remove(job)

    def copies_of(self, job_id: str) -> list[DeadJob]:
        return [job for job in self.held if job.job_id == job_id]

    @property
    def most_returned(self) -> int:
        return max((job.returned for job in self.held), default=0)


# -- operations (the CLI's and the tests' entry points) --------------------------------------


async def list_errors(
    settings: Settings,
    selection: Selection | None = None,
    *,
    limit: int | None = DEFAULT_LIMIT,
    max_scan: int = DEFAULT_MAX_SCAN,
) -> tuple[list[DeadJob], ErrorQueue]:
    """The first ``limit`` copies matching ``selection`` (every copy when None), all left in the
    queue; ``errors.matched`` says how many matched in all."""
    async with ErrorQueue.open(settings) as errors:
        jobs = await errors.scan(selection, max_scan=max_scan)
    return (jobs if limit is None else jobs[:limit]), errors


async def show_error(
    settings: Settings, job_id: str, *, max_scan: int = DEFAULT_MAX_SCAN
) -> list[DeadJob]:
    """Every copy of one job (usually one), all left in the queue."""
    async with ErrorQueue.open(settings) as errors:
        return await errors.scan(Selection(job_ids=frozenset({job_id})), max_scan=max_scan)


@dataclass
class ReplayOutcome:
    replayed: list[DeadJob] = field(default_factory=list)
    failed: list[tuple[DeadJob, str]] = field(default_factory=list)
    removed: int = 0  # copies deleted from the error queue (a job may have several)


def replay_message(
    job: DeadJob, *, timeout_s: float, keep_reply_to: bool, now: float | None = None
) -> aio_pika.Message:
    """The job as it is published again: same id and body, a fresh deadline, clean headers."""
    source = job.message
    now = time.time() if now is None else now
    deadline = now + timeout_s
    headers: dict[str, Any] = {
        k: v for k, v in (source.headers or {}).items() if k not in _DEATH_HEADERS
    }
    previous = headers.get(REPLAYED_HEADER)
    headers[REPLAYED_HEADER] = (previous if isinstance(previous, int) else 0) + 1
    # Integer epoch milliseconds, as modelfleet.client sends it.
    headers[DEADLINE_HEADER] = round(deadline * 1000)
    body = source.body
    try:
        decoded = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        decoded = None  # not a job a worker can run anyway: replayed as it was
    if isinstance(decoded, dict):
        decoded["deadline"] = deadline
        decoded["sent_at"] = now
        body = json.dumps(decoded, separators=(",", ":")).encode()
    return aio_pika.Message(
        body,
        headers=headers,
        content_type=source.content_type or "application/json",
        content_encoding=source.content_encoding,
        message_id=job.job_id,
        correlation_id=source.correlation_id or job.job_id,
        reply_to=source.reply_to if keep_reply_to else None,
        expiration=max(timeout_s, 0.001),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        timestamp=now,
        type="job",
    )


async def replay_errors(
    settings: Settings,
    selection: Selection,
    *,
    timeout_s: float | None = None,
    keep_reply_to: bool = False,
    max_scan: int = DEFAULT_MAX_SCAN,
) -> ReplayOutcome:
    """Publish the chosen jobs to ``{ns}.jobs`` again and remove them from the error queue.

    A job with several copies is published once and every copy is removed. A job the broker
    does not confirm (its model queue is full, say) stays in the error queue.
    """
    timeout = settings.client.timeout_s if timeout_s is None else timeout_s
    outcome = ReplayOutcome()
    async with ErrorQueue.open(settings) as errors:
        chosen = await errors.scan(selection, max_scan=max_scan)
        if not chosen:
            return outcome
        publisher = await errors.connection.channel(publisher_confirms=True)
        try:
            jobs_exchange = await publisher.get_exchange(errors.names.jobs)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise BrokerError(
                f"exchange {errors.names.jobs!r} does not exist: start a controller first"
            ) from None
        done: set[str] = set()
        for job in chosen:
            if job.job_id in done:
                continue
            try:
                check_model_name(job.model)
            except ValueError as exc:
                outcome.failed.append((job, f"cannot tell its model: {exc}"))
                continue
            message = replay_message(job, timeout_s=timeout, keep_reply_to=keep_reply_to)
            try:
                async with asyncio.timeout(settings.amqp.connect_timeout_s):
                    await jobs_exchange.publish(message, routing_key=job.model, mandatory=False)
            except aio_pika.exceptions.DeliveryError:
                outcome.failed.append((job, "refused by the broker (is the model's queue full?)"))
                continue
            except TimeoutError:
                outcome.failed.append((job, "the broker did not confirm the publish in time"))
                continue
            done.add(job.job_id)
            outcome.replayed.append(job)
            for copy in errors.copies_of(job.job_id):
                await errors.remove(copy)
                outcome.removed += 1
        await publisher.close()
    return outcome


async def purge_errors(
    settings: Settings,
    selection: Selection,
    *,
    confirm: Callable[[list[DeadJob]], bool | Awaitable[bool]] | None = None,
    max_scan: int = DEFAULT_MAX_SCAN,
) -> list[DeadJob]:
    """Delete the chosen copies; ``confirm`` (when given) sees them first and may say no."""
    async with ErrorQueue.open(settings) as errors:
        chosen = await errors.scan(selection, max_scan=max_scan)
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
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """``modelfleet errors list|show|replay|purge`` (called by :mod:`modelfleet.cli`)."""
    errors = commands.add_parser(
        "errors",
        parents=[common],
        help="inspect the error queue; replay or purge failed jobs",
        description="Inspect the error queue {ns}.errors; replay failed jobs or purge them.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = errors.add_subparsers(dest="errors_command", required=True, metavar="ACTION")
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
        "--reason", metavar="R", help=f"only jobs dead for reason R ({', '.join(_KNOWN_REASONS)})"
    )

    listing = actions.add_parser(
        "list", parents=[common, scan, filters], help="a table of the jobs in the error queue"
    )
    listing.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"show at most N jobs (default {DEFAULT_LIMIT})",
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")

    show = actions.add_parser(
        "show", parents=[common, scan], help="everything about one job: headers, properties, body"
    )
    show.add_argument("job_id", metavar="JOB_ID")
    show.add_argument("--json", action="store_true", help="print JSON")

    replay = actions.add_parser(
        "replay",
        parents=[common, scan, filters],
        help="publish chosen jobs to their model again and remove them from the error queue",
    )
    replay.add_argument("job_ids", nargs="*", metavar="JOB_ID")
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

    purge = actions.add_parser(
        "purge", parents=[common, scan, filters], help="delete chosen jobs from the error queue"
    )
    purge.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    purge.add_argument("--all", action="store_true", help="every job (narrowed by the filters)")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")


_EPILOG = """\
The queue is read with basic.get without acknowledging, on one channel; closing it hands every
copy not replayed or purged back to the broker. Meanwhile other readers do not see those copies,
and each hand-back adds one to a copy's x-delivery-count (RETURNED). RabbitMQ 3.x sets no
delivery limit on the error queue; RabbitMQ 4.0-4.2 default to 20 for quorum queues and would
drop a copy listed that often: lift it with a policy, for example
  rabbitmqctl set_policy mf-errors '^NS\\.errors$' '{"delivery-limit":-1}' \\
      --apply-to quorum_queues
Every command reads the whole queue (up to --max-scan; list --limit only limits the output)
so the order stays the queue's: handed-back copies go behind any never read, so a queue longer
than --max-scan, or a concurrent reader, rotates it. Select jobs by id, model or reason.
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
    headers = ["JOB_ID", "MODEL", "REASON", "AGE", "RETURNED", "ERROR"]
    rows = [
        [
            j.job_id,
            j.model,
            j.reason,
            format_age(j.age_s(now)),
            str(j.returned),
            _shorten(j.error, 70),
        ]
        for j in jobs
    ]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def render_details(copies: Sequence[DeadJob], queue: str) -> str:
    parts: list[str] = []
    for index, job in enumerate(copies, start=1):
        d = job.details()
        title = f"job {job.job_id}"
        if len(copies) > 1:
            title += f" (copy {index} of {len(copies)})"
        lines = [
            f"{title} in {queue}",
            f"  model:     {d['model']}",
            f"  reason:    {d['reason']}",
            f"  age:       {format_age(d['age_s'])}",
            f"  returned:  {d['returned']} time(s) to the queue (by listings)",
            f"  error:     {d['error']}",
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
        lines += ["  " + line for line in body.splitlines() or [""]]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _warn_returns(errors: ErrorQueue) -> None:
    if errors.most_returned >= RETURNS_WARNING:
        print(
            f"note: some copies were handed back to {errors.names.errors} "
            f"{errors.most_returned} times; RabbitMQ 4.0-4.2 drop a quorum-queue message after "
            "20 unless a policy lifts delivery-limit (see `modelfleet errors --help`)",
            file=sys.stderr,
        )


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
    """Run one ``modelfleet errors ...`` command; returns the exit code (BrokerError escapes)."""
    action: str = args.errors_command
    if args.max_scan < 1:
        return _usage("--max-scan must be at least 1")
    names = Names(settings.namespace)
    if action == "list":
        if args.limit < 1:
            return _usage("--limit must be at least 1")
        selection = Selection(everything=True, model=args.model, reason=args.reason)
        jobs, errors = await list_errors(
            settings, selection, limit=args.limit, max_scan=args.max_scan
        )
        now = time.time()
        if args.json:
            document = {
                "queue": names.errors,
                "in_queue": errors.in_queue,
                "matched": errors.matched,
                "jobs": [j.summary(now) for j in jobs],
            }
            print(json.dumps(document, indent=2))
        else:
            print(render_table(jobs, now))
            print(
                f"\n{len(jobs)} shown of {errors.matched} matching; "
                f"{errors.in_queue} in {names.errors}"
            )
        if errors.truncated:
            print(f"note: only the first {args.max_scan} copies were read", file=sys.stderr)
        _warn_returns(errors)
        return 0
    if action == "show":
        copies = await show_error(settings, args.job_id, max_scan=args.max_scan)
        if not copies:
            print(f"modelfleet: no job {args.job_id!r} in {names.errors}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps([c.details() for c in copies], indent=2, default=str))
        else:
            print(render_details(copies, names.errors))
        return 0
    selection = _selection(args)
    if selection.chooses_nothing:
        return _usage(f"errors {action}: name JOB_IDs, or pass --all (optionally --model/--reason)")
    if action == "replay":
        if args.timeout is not None and args.timeout <= 0:
            return _usage("--timeout must be positive")
        outcome = await replay_errors(
            settings,
            selection,
            timeout_s=args.timeout,
            keep_reply_to=args.keep_reply_to,
            max_scan=args.max_scan,
        )
        timeout = settings.client.timeout_s if args.timeout is None else args.timeout
        for job in outcome.replayed:
            print(f"replayed {job.job_id} to model {job.model} (was {job.reason})")
        for job, why in outcome.failed:
            print(f"NOT replayed {job.job_id} (model {job.model}): {why}", file=sys.stderr)
        print(
            f"{len(outcome.replayed)} job(s) replayed to {names.jobs} with a {timeout:g}s "
            f"deadline; {outcome.removed} copy(ies) removed from {names.errors}"
            + (f"; {len(outcome.failed)} left there" if outcome.failed else "")
        )
        if not outcome.replayed and not outcome.failed:
            print(f"modelfleet: no job in {names.errors} matched", file=sys.stderr)
            return 1
        return 1 if outcome.failed else 0
    if action == "purge":
        confirm: Callable[[list[DeadJob]], bool | Awaitable[bool]] | None = None
        if not args.yes:
            if not sys.stdin.isatty():
                return _usage("errors purge: stdin is not a terminal to confirm on; pass --yes")
            confirm = _confirm_on_tty
        purged = await purge_errors(settings, selection, confirm=confirm, max_scan=args.max_scan)
        for job in purged:
            print(f"purged {job.job_id} (model {job.model}, {job.reason})")
        print(f"{len(purged)} job copy(ies) purged from {names.errors}")
        return 0 if purged else 1
    raise AssertionError(f"unknown errors action {action}")


def _usage(text: str) -> int:
    print(f"modelfleet: {text}", file=sys.stderr)
    return 2
