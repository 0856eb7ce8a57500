"""Job cancellation: a producer that gives up on a job tells every worker, which then skips the
job if it has not started it, or cancels its handler if it is running, and frees the slot.

The path is one fanout exchange, ``{ns}.control`` (see :mod:`modelfleet.topology`). Each worker
binds a queue of its own to it (auto-delete, short TTL, capped) and consumes messages
``{"cancel": job_id, "key": cancel_key, "deadline": epoch_s}``. The producer side is
:class:`CancelPublisher`, used by
:class:`modelfleet.Client`: it publishes when :meth:`Client.cancel` is called and whenever a job is
abandoned before its answer (a ``submit`` task cancelled, a ``JobStream`` closed or broken out of,
an HTTP client of the gateway gone). The worker side is :class:`JobCanceller`:

* it remembers cancelled ids until the job's deadline (after which no worker starts the job
  anyway), at most :data:`MAX_REMEMBERED` ids and :data:`MAX_REMEMBER_S` seconds, so a queued job
  that reaches a worker later is acked without running (counted as ``cancelled``);
* it cancels the task of a running job whose handler is a coroutine or an async generator; the
  worker then acks the job and the slot is free at once.

**Only a job's producer can cancel it.** Anyone who may publish to ``{ns}.control`` can send a
cancel, and a job id is no secret (it travels in every message of the job). So the job id is
derived from a key only its producer knows: ``key`` is a keyed BLAKE2b of a counter under a
secret drawn once per :class:`~modelfleet.Client` (:func:`cancel_key`, no system call per job)
and ``job_id = sha256(key)[:32]`` (:func:`job_id_for`). A cancel ``{"cancel": job_id, "key":
key}`` is valid iff the key hashes to the id (:func:`key_matches`), which a worker checks on
arrival with no job at hand: a forged cancel is dropped at once and counted
(:attr:`JobCanceller.refused`), never stored, so no flood of them can push a valid one out; a
valid one is remembered until the job's deadline. A job id that is not such a hash (another
producer's, a replay of a job from before this scheme) cannot be cancelled by a message.

A handler running in a thread (a plain function or generator) cannot be interrupted: it runs to
its end, its answer is dropped by the producer, and only jobs it has not started are skipped.

Cancellation is best effort and never blocks: a lost control message only means the job runs
to its end, as it would have without cancellation. Users with least-privilege permissions that
do not cover ``{ns}.control`` get a warning and no cancellation, never a broken channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from secrets import token_hex
from typing import Any, NamedTuple, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

from modelfleet.jobs import Job
from modelfleet.notices import Refusal, parse_refusal
from modelfleet.topology import Topology, json_message

__all__ = [
    "MAX_REMEMBERED",
    "MAX_REMEMBER_S",
    "CancelPublisher",
    "CancelRequest",
    "CancelledJobs",
    "JobCancelled",
    "JobCanceller",
    "cancel_body",
    "cancel_key",
    "job_id_for",
    "key_matches",
    "parse_cancel",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# A worker remembers at most this many cancelled job ids (oldest forgotten first) ...
MAX_REMEMBERED = 100_000
# ... each for at most this long (a cancel without a deadline is kept this long).
MAX_REMEMBER_S = 3600.0
# A cancel is sent in the background; closing a client waits this long for the last ones.
CLOSE_WAIT_S = 1.0
# One publish of a cancel may take this long (a broker outage must not pile up tasks forever).
PUBLISH_TIMEOUT_S = 5.0
_MAX_BODY = 1024
_MAX_KEY = 128


class JobCancelled(Exception):
    """Internal to the worker: the job was cancelled by its producer (skip it or stop it)."""

    def __init__(self, job_id: str, *, started: bool) -> None:
        super().__init__(f"job {job_id} was cancelled by its producer")
        self.job_id = job_id
        self.started = started


def cancel_key(secret: bytes, counter: int) -> str:
    """The ``counter``-th cancel key of the producer holding ``secret``: 32 hex digits no one
    else can make (a keyed BLAKE2b: no system call per job)."""
    return hashlib.blake2b(counter.to_bytes(8, "big"), key=secret, digest_size=16).hexdigest()


def job_id_for(key: str) -> str:
    """The id of the job that ``key`` cancels: the first 32 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def key_matches(key: str, job_id: str) -> bool:
    """Does ``key`` cancel ``job_id``? Only if the id is the key's hash (see the module
    docstring); never an empty key."""
    if not key or not job_id:
        return False
    return hmac.compare_digest(job_id_for(key), job_id)


class CancelRequest(NamedTuple):
    """A parsed control message."""

    job_id: str
    deadline: float | None
    key: str


def cancel_body(job_id: str, deadline: float | None = None, key: str = "") -> bytes:
    """The control message that cancels ``job_id`` (``deadline``: the job's, epoch seconds;
    ``key``: the job's :func:`cancel_key`, without which no worker obeys it)."""
    body: dict[str, Any] = {"cancel": job_id}
    if key:
        body["key"] = key
    if deadline is not None and math.isfinite(deadline):
        body["deadline"] = deadline
    return json.dumps(body).encode()


def parse_cancel(body: bytes) -> CancelRequest | None:
    """The cancel in a control message, or None if it is not a valid one (a missing or
    malformed key parses as "": such a cancel is then refused, and counted, by the worker)."""
    if len(body) > _MAX_BODY:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    job_id = data.get("cancel")
    if not isinstance(job_id, str) or not job_id or len(job_id) > 256:
        return None
    key = data.get("key")
    if not isinstance(key, str) or len(key) > _MAX_KEY:
        key = ""
    deadline = data.get("deadline")
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)):
        return CancelRequest(job_id, None, key)
    return CancelRequest(job_id, float(deadline) if math.isfinite(deadline) else None, key)


class CancelledJobs:
    """Job ids cancelled recently: bounded in count and in time (pure; clock injected).

    >>> jobs = CancelledJobs(max_ids=2, max_keep_s=60)
    >>> jobs.add("a", keep_s=10, now=0.0)
    >>> jobs.contains("a", now=5.0), jobs.contains("a", now=11.0)
    (True, False)
    """

    def __init__(
        self, *, max_ids: int = MAX_REMEMBERED, max_keep_s: float = MAX_REMEMBER_S
    ) -> None:
        self.max_ids = max_ids
        self.max_keep_s = max_keep_s
        self._until: OrderedDict[str, float] = OrderedDict()  # job id -> forget after (monotonic)

    def __len__(self) -> int:
        return len(self._until)

    def add(self, job_id: str, *, keep_s: float | None, now: float) -> None:
        keep = self.max_keep_s if keep_s is None else min(max(keep_s, 0.0), self.max_keep_s)
        self._until.pop(job_id, None)
        self._until[job_id] = now + keep
        self.purge(now)
        while len(self._until) > self.max_ids:
            self._until.popitem(last=False)

    def contains(self, job_id: str, *, now: float) -> bool:
        until = self._until.get(job_id)
        return until is not None and until >= now

    def purge(self, now: float) -> None:
        """Forget expired ids (insertion order is close to expiry order: stop at a live one)."""
        while self._until:
            job_id, until = next(iter(self._until.items()))
            if until >= now:
                return
            del self._until[job_id]

    def snapshot(self, *, now: float) -> set[str]:
        return {job_id for job_id, until in self._until.items() if until >= now}


async def _plain_channel(
    connection: AbstractConnection, *, confirms: bool = False
) -> AbstractChannel:
    """A channel the broker may close for good (an access refusal must not be replayed)."""
    channel = aio_pika.Channel(connection, publisher_confirms=confirms)
    await channel.initialize()
    return channel


async def _allowed(
    connection: AbstractConnection, operation: Callable[[Any], Awaitable[Any]]
) -> str:
    """Run ``operation`` on a throw-away channel; "" if it worked, else why not."""
    probe = await _plain_channel(connection)
    try:
        await operation(probe)
    except (
        aiormq.exceptions.ChannelAccessRefused,
        aiormq.exceptions.ChannelNotFoundEntity,
        aiormq.exceptions.ChannelPreconditionFailed,
    ) as exc:
        return str(exc) or type(exc).__name__
    finally:
        if not probe.is_closed:
            with contextlib.suppress(Exception):
                await probe.close()
    return ""


async def _control_exchange_exists(connection: AbstractConnection, topology: Topology) -> str:
    """Declare ``{ns}.control`` where allowed, else check that it exists; "" when usable."""
    refused = await _allowed(connection, topology.declare_control)
    if not refused:
        return ""
    missing = await _allowed(
        connection, lambda ch: ch.declare_exchange(topology.names.control, passive=True)
    )
    return f"{refused}; {missing}" if missing else ""


class JobCanceller:
    """The worker's side: which jobs are cancelled, and the tasks of the running ones.

    A cancel is obeyed only with the job's key (see the module docstring); :attr:`refused`
    counts those dropped on arrival (no key, or one that does not hash to the job id).

    Args:
        instance: names the worker's control queue (``{ns}.control.{instance}-{random}``).
        cancel_running: cancel the task of a running job (False for thread handlers, which
            cannot be interrupted: only jobs not yet started are skipped).
        clock: monotonic clock (tests inject one).
    """

    def __init__(
        self,
        instance: str,
        *,
        cancel_running: bool = True,
        clock: Callable[[], float] = time.monotonic,
        memory: CancelledJobs | None = None,
        on_refusal: Callable[[Refusal], None] | None = None,
    ) -> None:
        self.instance = f"{instance}-{token_hex(3)}"
        # Called with a controller's refusal notice (modelfleet.notices) for this worker.
        self.worker_id = instance
        self.on_refusal = on_refusal
        self.cancel_running = cancel_running
        self.clock = clock
        self.memory = memory or CancelledJobs()
        self.listening = False
        self.refused = 0  # cancels ignored for want of the job's key
        # Job id -> the tasks running it here: more than one when a job is delivered again
        # while its first delivery still runs (a cancel stops them all).
        self._running: dict[str, list[asyncio.Task[Any]]] = {}
        self._requested: set[asyncio.Task[Any]] = set()
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None  # a strong reference: the robust channel
        # restores only what it still holds

    # -- decisions ---------------------------------------------------------------------

    def is_cancelled(self, job_id: str) -> bool:
        """A valid cancel came for ``job_id`` (and is still remembered)."""
        return self.memory.contains(job_id, now=self.clock())

    def check(self, job: Job) -> None:
        """Raise :class:`JobCancelled` if ``job`` was cancelled by its producer before it
        started (only valid cancels are remembered: no key to check here)."""
        if self.memory.contains(job.job_id, now=self.clock()):
            raise JobCancelled(job.job_id, started=False)

    def cancel(self, job_id: str, deadline: float | None = None, key: str = "") -> bool:
        """Obey a cancel of ``job_id`` if ``key`` is its key (else drop it, counted in
        :attr:`refused`): remember it until ``deadline`` and stop the job if it runs here;
        True if it was stopped."""
        if not key_matches(key, job_id):
            self.refused += 1
            return False
        keep = None if deadline is None else deadline - time.time() + 1.0
        self.memory.add(job_id, keep_s=keep, now=self.clock())
        tasks = [
            task
            for task in self._running.get(job_id, ())
            if not task.done() and task not in self._requested
        ]
        if not tasks:
            return False
        for task in tasks:
            self._requested.add(task)
            task.cancel(f"job {job_id} cancelled by its producer")
        return True

    async def run(self, job_id: str, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` (the handler) so that :meth:`cancel` can stop it: it then raises
        :class:`JobCancelled`. Any other cancellation (stop grace) propagates unchanged."""
        task = asyncio.current_task()
        if task is None or not self.cancel_running:
            return await awaitable
        running = self._running.setdefault(job_id, [])
        running.append(task)
        try:
            result = await awaitable
        except asyncio.CancelledError:
            if task in self._requested:
                self._requested.discard(task)
                if task.uncancel() == 0:  # ours alone (not also the worker's stop grace)
                    raise JobCancelled(job_id, started=True) from None
            raise
        finally:
            running.remove(task)
            if not running:
                del self._running[job_id]
        if task in self._requested:
            # The handler swallowed the cancellation and returned: undo our request so later
            # awaits of this task (the reply, the ack) are not cancelled.
            self._requested.discard(task)
            task.uncancel()
        return result

    # -- the control queue -------------------------------------------------------------

    async def start(self, connection: AbstractConnection, topology: Topology) -> bool:
        """Bind and consume this worker's control queue; False (and a warning) if this AMQP
        user may not, in which case the worker runs without cancellation."""
        why = await _control_exchange_exists(connection, topology)
        if not why:
            why = await _allowed(
                connection, lambda ch: topology.declare_control_queue(ch, self.instance)
            )
        if why:
            log.warning(
                "job cancellation is off: cannot use %s (%s); grant this user %s",
                topology.names.control,
                why,
                topology.names.control_queue("*"),
            )
            return False
        self._channel = await connection.channel(publisher_confirms=False)
        self._queue = await topology.declare_control_queue(self._channel, self.instance)
        await self._queue.consume(self._on_control, no_ack=True)
        self.listening = True
        return True

    async def rebind(self, connection: AbstractConnection, topology: Topology) -> None:
        """Bind this worker's control queue again (idempotent): a ``{ns}.control`` deleted and
        declared again has lost the binding, and cancels would no longer arrive. On a channel
        of its own, so a refusal (the exchange missing right now) closes nothing else."""
        if not self.listening:
            return
        channel = aio_pika.Channel(connection, publisher_confirms=False)
        await channel.initialize()
        try:
            queue = await channel.get_queue(
                topology.names.control_queue(self.instance), ensure=False
            )
            await queue.bind(topology.names.control)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        parsed = parse_cancel(message.body)
        if parsed is None:
            refusal = parse_refusal(message.body)
            if refusal is not None and refusal.worker_id == self.worker_id and self.on_refusal:
                self.on_refusal(refusal)
            return
        job_id, deadline, key = parsed
        if self.cancel(job_id, deadline, key):
            log.info("job %s cancelled by its producer: stopping its handler", job_id)


class CancelPublisher:
    """The producer's side: publishes cancels on a channel of its own, in the background.

    A refused publish (no write permission on ``{ns}.control``) closes only this channel, and
    turns cancellation off with one warning; a closed channel (connection lost) is reopened on
    the next cancel.
    """

    def __init__(self, connection: AbstractConnection, topology: Topology) -> None:
        self.connection = connection
        self.topology = topology
        self.enabled = True
        self.sent = 0
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, connection: AbstractConnection, topology: Topology) -> CancelPublisher:
        publisher = cls(connection, topology)
        why = await _control_exchange_exists(connection, topology)
        if why:
            log.warning(
                "job cancellation is off: %s is not usable (%s)", topology.names.control, why
            )
            publisher.enabled = False
        return publisher

    def send(self, job_id: str, deadline: float | None = None, key: str = "") -> None:
        """Publish a cancel for ``job_id`` (with its ``key``: :func:`cancel_key`) in the
        background (never blocks, never raises)."""
        if not self.enabled:
            return
        task = asyncio.get_running_loop().create_task(
            self._publish(job_id, deadline, key), name=f"modelfleet-cancel-{job_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def publish(self, job_id: str, deadline: float | None = None, key: str = "") -> None:
        """Publish a cancel for ``job_id`` now (bounded by :data:`PUBLISH_TIMEOUT_S`)."""
        if self.enabled:
            await self._publish(job_id, deadline, key)

    async def _publish(self, job_id: str, deadline: float | None, key: str) -> None:
        message = json_message(
            cancel_body(job_id, deadline, key),
            type="cancel",
            expiration=PUBLISH_TIMEOUT_S * 12,  # a cancel older than a minute is worthless
        )
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                exchange = await self._ready_exchange()
                await exchange.publish(message, routing_key="", mandatory=False)
            self.sent += 1
        except aiormq.exceptions.ChannelAccessRefused as exc:
            self.enabled = False
            log.warning(
                "job cancellation is off: may not publish to %s (%s)",
                self.topology.names.control,
                exc,
            )
        except Exception as exc:  # an outage: the job simply runs to its end
            log.info("cancel of job %s not sent: %s", job_id, exc or type(exc).__name__)
            self._exchange = None

    async def _ready_exchange(self) -> AbstractExchange:
        if self._exchange is not None and self._channel is not None and not self._channel.is_closed:
            return self._exchange
        # After a connection loss (a job reported CONNECTION_LOST is cancelled): wait for the
        # reconnection, within this publish's timeout.
        await self.connection.ready()
        # Confirms: a refused publish then fails this publish (and turns cancels off) instead
        # of closing the channel silently before every next one.
        self._channel = await _plain_channel(self.connection, confirms=True)
        self._exchange = await self._channel.get_exchange(self.topology.names.control, ensure=False)
        return self._exchange

    async def aclose(self) -> None:
        """Let the cancels still being sent go out (briefly), then close the channel."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CLOSE_WAIT_S)
        for task in list(self._tasks):
            task.cancel()
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()
