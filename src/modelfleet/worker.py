"""The worker SDK: serve one or more models from their queues with a handler.

A handler takes a :class:`~modelfleet.jobs.Job` and is one of:

* a coroutine function — ``async def handle(job): return {...}``;
* a plain function — run in a thread, so the event loop (and the heartbeats) stay live;
* an async or plain generator — a stream: each yield is a chunk; ``yield Final(value)`` sets the
  result (a plain generator may also ``return value``).

>>> async def handle(job: Job) -> dict:
...     return {"text": job.payload["prompt"].upper()}
>>> worker = Worker(handle, models=["shout"], settings=settings)
>>> await worker.run()  # until SIGTERM / SIGINT

Guarantees: at most ``concurrency`` jobs run at once (prefetch per model queue, plus a semaphore
across models); a job is acked only after its answer was published, so a worker that dies
mid-job leaves it to another worker; a handler exception or an invalid job never stops the
worker — the producer gets an error reply and the job goes to the error queue.

Faults below the handler: every reply carries the ``attempt_id`` of its delivery; a reply that
cannot be published because the delivery's channel is gone is no handler error (no error reply,
no error copy, no ack: the broker redelivers the job; counted in ``reply_lost``). Replies go
only to direct reply-to addresses: a job whose ``reply_to`` is anything else is refused as
invalid before it runs (counted in ``reply_refused``). A job that
never started (delivered while stopping or paused) is handed back by a confirmed republish, so
it spends none of its ``x-delivery-limit``; one handed back after it started does. Heartbeats use
a channel of their own, and each model queue a job channel of its own, so replacing one never
requeues another model's running jobs. A model queue whose consumer is gone (queue deleted,
channel closed) is consumed again within seconds, the heartbeats saying ``draining`` meanwhile,
or the worker exits (see :class:`ResubscribePolicy`); a network or broker outage is aio-pika's
to recover and counts toward no give-up. A *phantom* consumer (RabbitMQ 3.10: a quorum queue
deleted and at once declared again sends no cancel; the new queue counts the old consumer and
hands it jobs the channel never delivers) is found by the passive declare when jobs wait ready
behind it, and otherwise by renewing quiet channels (see :class:`IdleRecycle` for its limits).
The consumer watch runs in a task of its own, so it never delays a heartbeat, and no RPC of a
job channel is ever cancelled by a timeout (aiormq would close the channel and requeue its jobs).

Known window: a hand-back (republish, then ack) under way when its job channel closes leaves
the republished copy and the broker's own requeue of the original: that job runs twice.

Where this module goes below aio-pika's public API, and the tests that cover it, is listed
in :mod:`modelfleet.connections`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from secrets import token_hex
from typing import Any, Literal

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import BaseModel, ValidationError

from modelfleet import __version__
from modelfleet.acks import AckBatcher
from modelfleet.addressing import is_direct_reply_to
from modelfleet.cancel import JobCancelled, JobCanceller
from modelfleet.config import Settings, load_settings
from modelfleet.connections import connect
from modelfleet.errors import ErrorCode, InvalidJobError, JobError
from modelfleet.jobs import Final, Job
from modelfleet.messages import (
    ChunkReply,
    ErrorReply,
    Heartbeat,
    JobCounters,
    JobRequest,
    ResultReply,
    WorkerState,
    check_model_name,
)
from modelfleet.notices import Refusal
from modelfleet.presence import ControllerWatch, QueueLooks, unserved_worker_text
from modelfleet.publishing import publish_on, reply_properties
from modelfleet.security import amqp_user, declare_where_allowed
from modelfleet.stats import Outcome, WorkerStats
from modelfleet.topology import (
    DEADLINE_HEADER,
    DeadReason,
    Names,
    Topology,
    dead_copy,
    json_message,
)

__all__ = [
    "Handler",
    "IdleRecycle",
    "ResubscribePolicy",
    "Worker",
    "handback_expiration",
    "handback_headers",
]

log = logging.getLogger(__name__)

Handler = Callable[[Job], Any]

_STREAM_END = object()
# A quiet model queue's job channel is renewed at most this long apart, seconds: on RabbitMQ
# 3.10 a phantom consumer (IdleRecycle) holds jobs no longer than this. Measured cost: a few
# frames per quiet model and worker each time.
IDLE_RENEW_MAX_S = 8.0
# The consumer watch binds the control queue again every this many looks (heartbeat
# intervals): bindings die with their exchange, and a lost one would drop cancels silently.
REBIND_CONTROL_EVERY = 10
# The worker warns when no controller has consumed {ns}.unroutable for this many heartbeat
# intervals (a controller restart takes less; the warning then repeats once a minute).
NO_CONTROLLER_WARN_LOOKS = 3
# Set-up attempts when the broker closes the connection during it (see Worker.start).
_START_ATTEMPTS = 5
# Dead-letter reason of a job whose handler raised a JobError with this code.
_DEAD_REASON_OF = {
    ErrorCode.OVERLOADED: DeadReason.OVERLOADED,
    ErrorCode.WORKER_TIMEOUT: DeadReason.EXPIRED,
    ErrorCode.EXPIRED: DeadReason.EXPIRED,
}
# A flood of bad jobs must not flood the log: each failure cause is logged at most this often
# (every failure is still counted, in the heartbeat's counters).
LOG_CAUSE_EVERY_S = 60.0
# A reply publish that fails with one of these lost the delivery with its channel: the broker
# requeues the job, so it is neither the handler's error nor a job to copy to the error queue.
_TRANSPORT_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, aiormq.ChannelInvalidStateError)
# How long a hand-back (a republish of a job that never started) may wait for its confirm.
_HANDBACK_TIMEOUT_S = 5.0
# The consumer watch asks the broker about a quiet model queue (a passive declare) once every
# this many looks (heartbeat intervals), and at every look while it misses a consumer.
_PROBE_EVERY = 3


def handback_expiration(
    headers: Mapping[str, Any] | None, expiration: Any, now: float
) -> float | None:
    """The expiration (seconds) of a job republished at ``now`` (epoch s).

    The producer's deadline (header ``x-mf-deadline``, epoch ms) bounds it: the copy expires when
    the original would have, at least 1 ms from now. Without the header the original expiration
    (seconds, as aio-pika decodes it) is kept as it was; a job that had none never expires.
    """
    deadline = (headers or {}).get(DEADLINE_HEADER)
    if isinstance(deadline, int) and not isinstance(deadline, bool):
        return max(1, deadline - int(now * 1000)) / 1000
    if isinstance(expiration, (int, float)) and not isinstance(expiration, bool):
        return max(0.001, float(expiration))
    return None


def handback_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The headers of a republished job: the original's without the broker's delivery count
    (the copy is a first delivery, which is what a job that never started is)."""
    return {k: v for k, v in (headers or {}).items() if k != "x-delivery-count"}


class ResubscribePolicy:
    """When a worker re-subscribes a model queue nobody consumes for it any more, and when it
    gives up (pure; the caller passes the clock).

    ``grace_s`` leaves aio-pika's own recovery (channel reopen, consumer restore) the first go;
    then the worker tries itself every ``retry_s`` (doubling up to ``max_retry_s``); after
    ``give_up_s`` without a consumer it gives up and exits, so a supervisor restarts it.
    """

    WAIT = "wait"
    RETRY = "retry"
    GIVE_UP = "give_up"

    def __init__(
        self,
        *,
        grace_s: float = 2.0,
        retry_s: float = 0.5,
        max_retry_s: float = 5.0,
        give_up_s: float = 30.0,
    ) -> None:
        self.grace_s = grace_s
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self.give_up_s = give_up_s
        self._since: dict[str, float] = {}
        self._next: dict[str, float] = {}
        self._wait: dict[str, float] = {}

    @property
    def missing(self) -> frozenset[str]:
        """Models without a consumer right now."""
        return frozenset(self._since)

    def observe(self, model: str, consuming: bool, now: float) -> str:
        """What to do about ``model`` at ``now``: WAIT, RETRY (re-subscribe now) or GIVE_UP."""
        if consuming:
            self._since.pop(model, None)
            self._next.pop(model, None)
            self._wait.pop(model, None)
            return self.WAIT
        since = self._since.setdefault(model, now)
        if now - since >= self.give_up_s:
            return self.GIVE_UP
        due = self._next.setdefault(model, since + self.grace_s)
        if now < due:
            return self.WAIT
        wait = self._wait.get(model, self.retry_s)
        self._wait[model] = min(wait * 2, self.max_retry_s)
        self._next[model] = now + wait
        return self.RETRY

    def forget(self, model: str) -> None:
        """Stop watching ``model`` (paused or stopping: no consumer is expected)."""
        self.observe(model, True, 0.0)


class IdleRecycle:
    """When a worker replaces the job channel of a model queue that has delivered nothing for
    a while (pure; the caller passes the clock).

    Why: RabbitMQ 3.10 sends no cancel when a quorum queue is deleted and at once declared
    again. The channel keeps a *phantom* consumer that the new queue counts as its consumer
    (``consumer_count`` 1, checked on the real broker) and hands jobs to, up to the prefetch;
    the channel never delivers them and holds them unacked until it closes. Over AMQP such a
    consumer looks exactly like a healthy idle one (no jobs ready, one consumer), so the only
    sound cure is to close that channel: after ``after_s`` without a delivery, and only when
    nothing of that channel is unsettled, the worker cancels the consumer, then (if still
    nothing arrived) replaces the channel: a few frames (cancel, channel open, qos, declare,
    consume, close) per quiet model and worker; the worker sets ``after_s`` to 4 heartbeat
    intervals and ``max_after_s`` to ``IDLE_RENEW_MAX_S`` (8 s), or 4 intervals if longer.
    Each replacement that finds the queue still idle doubles the wait, up to ``max_after_s``; a
    delivery resets it.

    Limits: jobs held by a phantom wait up to the current wait (``after_s`` just after a
    delivery, at most ``max_after_s`` on a queue idle for long) and are then redelivered, which
    counts toward their ``x-delivery-limit``; a job whose delivery is still on its way to the
    worker when the channel closes (rare: the consumer is cancelled first) is requeued the same
    way. A phantom on a channel that still has running jobs waits for them to settle. A phantom
    behind a backlog is found sooner, by the passive declare (jobs ready while this consumer,
    with credit, got none).
    """

    def __init__(self, *, after_s: float, max_after_s: float) -> None:
        self.after_s = after_s
        self.max_after_s = max(after_s, max_after_s)
        self._quiet_since: dict[str, float] = {}
        self._wait: dict[str, float] = {}

    def observe(self, model: str, delivered: bool, unsettled: int, now: float) -> bool:
        """True: replace ``model``'s channel now (quiet for the current wait, nothing
        unsettled on it)."""
        if delivered or unsettled:
            self._quiet_since[model] = now
            if delivered:
                self._wait.pop(model, None)
            return False
        since = self._quiet_since.setdefault(model, now)
        wait = self._wait.get(model, self.after_s)
        if now - since < wait:
            return False
        self._wait[model] = min(wait * 2, self.max_after_s)
        self._quiet_since[model] = now
        return True

    def forget(self, model: str) -> None:
        """Start afresh for ``model`` (paused, or its channel was replaced for another cause)."""
        self._quiet_since.pop(model, None)


class _ReplyLost(Exception):
    """Internal: a reply could not be published because the delivery's channel is gone."""


@dataclass(eq=False)
class _Consumer:
    """One model queue this worker consumes, on a job channel of its own (``tag`` "" while
    paused). ``deliveries`` counts what this consumer got (the watchdog compares it with
    ``seen``, its value at the last look)."""

    model: str
    queue: AbstractQueue
    channel: AbstractChannel
    tag: str = ""
    deliveries: int = 0
    seen: int = 0
    looks: int = 0  # watchdog looks since the last passive declare


class _HandlerKind:
    ASYNC = "async"
    THREAD = "thread"
    ASYNC_GEN = "async_gen"
    GEN = "gen"


def _kind_of(handler: Handler) -> str:
    target = handler
    if not (inspect.isfunction(target) or inspect.ismethod(target)) and callable(target):
        call = getattr(target, "__call__", None)  # noqa: B004 - callable objects
        target = call if call is not None else target
    if inspect.isasyncgenfunction(target):
        return _HandlerKind.ASYNC_GEN
    if inspect.isgeneratorfunction(target):
        return _HandlerKind.GEN
    if inspect.iscoroutinefunction(target):
        return _HandlerKind.ASYNC
    return _HandlerKind.THREAD


class _Failure(Exception):
    """Internal: end a job with an error reply and a dead-letter reason."""

    def __init__(self, code: ErrorCode, reason: str, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        # A word from a small fixed set, for logging once per cause: finer than the reason.
        self.cause = cause or reason


class Worker:
    """Serves ``models`` with ``handler``.

    Keywords:
        settings: all tunables (``worker.*``, ``heartbeat.*``, ``amqp.*``, ``namespace``);
            when omitted, :func:`~modelfleet.config.load_settings` reads them as the commands
            do (``MODELFLEET_*`` environment, ``$MODELFLEET_CONFIG`` or
            ``./config/settings.toml``).
        url: AMQP URL, overrides ``settings.amqp.url``.
        namespace: overrides ``settings.namespace``.
        concurrency: jobs at once, overrides ``settings.worker.concurrency``.
        worker_id: stable identity in the registry (default: ``host-pid-random``).
        install_signal_handlers: :meth:`run` stops cleanly on SIGTERM/SIGINT (default True).
        on_stuck: called when the worker cannot go on — a job outlived ``worker.stuck_exit_s``,
            or a model queue could not be consumed again within ``resubscribe.give_up_s`` —
            after the final heartbeat (default: exit the process with status 75, so a supervisor
            restarts it).

    A model queue whose consumer is gone (the queue deleted, the channel closed by an error)
    is consumed again within seconds of the queue existing again (see :attr:`resubscribe`);
    meanwhile the heartbeats say ``draining``, never ``ready``.
    """

    def __init__(
        self,
        handler: Handler,
        models: Iterable[str],
        *,
        settings: Settings | None = None,
        url: str | None = None,
        namespace: str | None = None,
        concurrency: int | None = None,
        worker_id: str | None = None,
        install_signal_handlers: bool = True,
        on_stuck: Callable[[], None] | None = None,
    ) -> None:
        # No settings: the same sources the commands read (environment, settings file).
        self.settings = settings if settings is not None else load_settings()
        self.models: tuple[str, ...] = tuple(dict.fromkeys(check_model_name(m) for m in models))
        if not self.models:
            raise ValueError("a worker needs at least one model")
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        self.handler = handler
        self._kind = _kind_of(handler)
        self.url = url or self.settings.amqp.url
        self.names = Names(namespace or self.settings.namespace)
        self.topology = Topology(self.names, self.settings.routing, self.settings.heartbeat)
        self._queue_names = frozenset(self.names.model_queue(m) for m in self.models)
        self.concurrency = concurrency or self.settings.worker.concurrency
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{token_hex(3)}"
        self._install_signals = install_signal_handlers
        # What to do when a job outlives worker.stuck_exit_s (default: end the process).
        self.on_stuck: Callable[[], None] = on_stuck or _exit_process

        self.state = WorkerState.READY
        self.counters: dict[str, int] = dict.fromkeys(JobCounters.model_fields, 0)
        self.stats = WorkerStats(self.models)
        # This worker's wall-clock start: with seq it orders heartbeats of a reused worker_id.
        self.started_at = time.time()
        self.resubscribe = ResubscribePolicy(
            grace_s=max(2.0, 2 * self.settings.amqp.reconnect_interval_s)
        )
        interval = self.settings.heartbeat.interval_s
        # At most 4 intervals (8 s by default) between renewals: a phantom holds jobs no longer
        # than that, for a few frames per quiet model and worker every 8 s.
        self.idle_recycle = IdleRecycle(
            after_s=4 * interval, max_after_s=max(IDLE_RENEW_MAX_S, 4 * interval)
        )
        # One token per delivery: replies carry it (attempt_id), and running jobs are keyed by
        # it, so two deliveries of one job id are two entries. A random prefix and a counter:
        # unique without a system call per job.
        self._attempt_prefix = token_hex(4)
        self._attempt_numbers = itertools.count(1)
        self._running: dict[str, float] = {}  # attempt id -> monotonic start
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handbacks: set[asyncio.Future[None]] = set()  # shielded from the stop grace
        self._slots = asyncio.Semaphore(self.concurrency)
        self._seq = 0
        self._connection: AbstractRobustConnection | None = None
        self._dead_channel: AbstractChannel | None = None
        # Heartbeats have a channel of their own: a heartbeat the broker refuses (user_id,
        # missing exchange) closes that channel only, never the one holding the running jobs.
        self._hb_channel: AbstractChannel | None = None
        self._hb_exchange: AbstractExchange | None = None
        self._probe: AbstractChannel | None = None  # the consumer watch's passive declares
        self._by_tag: dict[str, _Consumer] = {}  # consumer tag -> its model queue's consumer
        # Consumer cancels and channel closes left running after their wait ran out: an RPC on
        # a job channel is never cancelled (aiormq would close the channel, requeueing its jobs).
        self._background: set[asyncio.Future[Any]] = set()
        # Held while consumers are added or removed (pause, resume, stop, the watchdog's
        # re-subscribe), so none of them stores a tag another one is cancelling.
        self._subscribing = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        self._watching = False  # the watch is inside a look (it may be in an RPC)
        # Whether a controller consumes {ns}.unroutable (modelfleet.presence): without one,
        # the model queues stay unbound and the log says so.
        self.controllers = ControllerWatch(remember_s=0.0)
        self._looks: QueueLooks | None = None
        self._warned_unserved = False
        self._dead_exchange: AbstractExchange | None = None
        self._consumers: list[_Consumer] = []
        self._hb_task: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._started = False
        self._stop_reason: Literal["shutdown", "stuck"] = "shutdown"
        self._logged_causes: dict[str, float] = {}  # failure cause -> monotonic time logged
        # Producers' cancellations (modelfleet.cancel); a thread cannot be interrupted, so only
        # coroutine and async-generator handlers are stopped mid-run.
        self.cancels = JobCanceller(
            self.worker_id,
            cancel_running=self._kind in (_HandlerKind.ASYNC, _HandlerKind.ASYNC_GEN),
            on_refusal=self._refused,
        )
        self.refusal: Refusal | None = None  # the last controller refusal heard (notices)
        self._paused = False  # pause(): consumers cancelled, state draining, until resume()
        self._acks = AckBatcher()  # finished jobs are acked in batches, one per loop turn

    # -- figures -------------------------------------------------------------------------

    @property
    def replies_lost(self) -> int:
        """Replies lost with their delivery's channel (the broker redelivered those jobs)."""
        return self.counters["reply_lost"]

    @property
    def handed_back(self) -> int:
        """Jobs that never started, handed back without spending their delivery limit."""
        return self.counters["handed_back"]

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def oldest_job_age_s(self, now: float | None = None) -> float:
        if not self._running:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(0.0, now - min(self._running.values()))

    def heartbeat(self, state: WorkerState | None = None) -> Heartbeat:
        """The heartbeat this worker would send now."""
        now = time.monotonic()
        stuck_after = self.settings.worker.stuck_after_s
        self._seq += 1
        return Heartbeat(
            worker_id=self.worker_id,
            models=self.models,
            concurrency=self.concurrency,
            in_flight=self.in_flight,
            oldest_job_age_s=self.oldest_job_age_s(now),
            stuck_jobs=sum(1 for t in self._running.values() if now - t > stuck_after),
            state=self._reported_state(state),
            speed=self.settings.worker.speed,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            sent_at=time.time(),
            interval_s=self.settings.heartbeat.interval_s,
            seq=self._seq,
            counters=JobCounters(**self.counters),
            stats=self.stats.snapshot(),
            stop_reason=self._stop_reason
            if (state or self.state) is WorkerState.STOPPING
            else None,
            started_at=self.started_at,
        )

    def _reported_state(self, state: WorkerState | None) -> WorkerState:
        # A worker missing a consumer must not look ready: the controller routes around it.
        if state is None and self.state is WorkerState.READY and self.resubscribe.missing:
            return WorkerState.DRAINING
        return state or self.state

    # -- life cycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect, declare, start consuming and heartbeating."""
        if self._started:
            return
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                await self._open()
                break
            except aiormq.exceptions.ConnectionInternalError as exc:
                # RabbitMQ 3.10 crashes the channel (and closes the connection with
                # INTERNAL_ERROR) on a basic.consume that reaches a quorum queue another worker
                # is declaring at this very moment, before its Raft member runs. A moment later
                # the queue is there: start again.
                await self._close_connection()
                if attempt == _START_ATTEMPTS:
                    raise
                log.warning(
                    "worker %s: the broker closed the connection while it set up (%s); "
                    "trying again (%d/%d)",
                    self.worker_id,
                    exc,
                    attempt,
                    _START_ATTEMPTS,
                )
                await asyncio.sleep(0.2 * attempt)
            except BaseException:
                await self._close_connection()  # a failed start leaves nothing open
                raise
        self._started = True
        await self._send_heartbeat()
        self._hb_task = asyncio.create_task(self._heartbeat_loop(), name="modelfleet-heartbeat")
        self._watch_task = asyncio.create_task(self._watch_loop(), name="modelfleet-watch")
        log.info(
            "worker %s serving %s (concurrency %d, namespace %s)",
            self.worker_id,
            ", ".join(self.models),
            self.concurrency,
            self.names.ns,
        )

    async def _open(self) -> None:
        """Connect, declare and consume (:meth:`start` without the retries)."""
        self._consumers = []
        self._by_tag = {}
        self._connection = await connect(self.settings.amqp, role="worker", url=self.url)
        # Confirms: dead-letter copies and hand-backs (republished jobs) must reach their queue
        # before the original is acked; a hand-back that no queue takes comes back (mandatory).
        self._dead_channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        # A least-privilege worker may not declare the namespace: then it only checks it.
        await declare_where_allowed(
            self._connection,
            self._dead_channel,
            self.topology.declare_base,
            required=(self.names.heartbeats, self.names.dead),
        )
        self._dead_exchange = await self._dead_channel.get_exchange(self.names.dead)
        await self._heartbeat_exchange()
        # Before consuming: a job delivered before _started is handed back, so nothing slow may
        # come between the two.
        await self.cancels.start(self._connection, self.topology)
        for model in self.models:
            # A channel per model: replacing one (a phantom consumer, a channel error) never
            # requeues the running jobs of another model.
            channel = await self._job_channel()
            queue = await self.topology.declare_model_queue(channel, model)
            consumer = _Consumer(model, queue, channel)
            if not self._paused:
                consumer.tag = await queue.consume(self._on_message)
                self._by_tag[consumer.tag] = consumer
            self._consumers.append(consumer)

    @property
    def _channel(self) -> AbstractChannel | None:
        """The job channel of the first model (tests and single-model workers)."""
        return self._consumers[0].channel if self._consumers else None

    async def _job_channel(self) -> AbstractChannel:
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=False)
        # Quorum queues have no global QoS: prefetch is per consumer, the semaphore caps the sum.
        # worker.prefetch above concurrency: jobs wait here for a slot instead of for an ack's
        # round trip to the broker.
        await channel.set_qos(prefetch_count=max(self.concurrency, self.settings.worker.prefetch))
        return channel

    async def _close_connection(self) -> None:
        self._hb_channel = self._hb_exchange = self._probe = None
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or :meth:`request_stop`), then stop cleanly."""
        await self.start()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if self._install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.request_stop)
                    installed.append(sig)
        try:
            await self._stop_requested.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking jobs, let in-flight ones finish (or hand them back after ``grace_s``),
        send a final ``stopping`` heartbeat and close."""
        if not self._started:
            return
        self._started = False
        self._stop_requested.set()
        grace = self.settings.worker.stop_grace_s if grace_s is None else grace_s
        self.state = WorkerState.DRAINING
        await self._cancel_consumers()
        await self._send_heartbeat()
        pending = set(self._tasks)
        if pending:
            log.info(
                "worker %s: waiting up to %.1fs for %d job(s)", self.worker_id, grace, len(pending)
            )
            _, pending = await asyncio.wait(pending, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        if self._handbacks:
            await asyncio.wait(set(self._handbacks), timeout=_HANDBACK_TIMEOUT_S)
        await self._stop_watch()
        if self._hb_task is not None:
            self._hb_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._hb_task
        await self._acks.aclose(timeout_s=_HANDBACK_TIMEOUT_S)
        self.state = WorkerState.STOPPING
        await self._send_heartbeat()
        await self._close_connection()
        log.info("worker %s stopped", self.worker_id)

    async def pause(self) -> None:
        """Stop taking jobs until :meth:`resume`: cancel the consumers and report ``draining``
        (the controller then routes around this worker). Jobs already running finish; jobs
        delivered but not started go back to the queue. Callable before :meth:`start`."""
        if self._paused:
            return
        self._paused = True
        self.state = WorkerState.DRAINING
        await self._cancel_consumers()
        # A cancelled phantom consumer still holds its jobs (and the broker still counts it):
        # only its channel's close returns them. Channels with nothing unsettled close for free;
        # resume opens new ones.
        closing = []
        for consumer in self._consumers:
            if not consumer.channel.is_closed and await self._unsettled_on(consumer) == 0:
                closing.append(self._in_background(consumer.channel.close()))
        if closing:
            await asyncio.wait(closing, timeout=self.settings.heartbeat.interval_s)
        await self._send_heartbeat()

    async def resume(self) -> None:
        """Take jobs again after :meth:`pause` (state ``ready``)."""
        if not self._paused or self._stop_requested.is_set():
            return
        async with self._subscribing:
            self._paused = False
            for consumer in self._consumers:
                if consumer.tag or not self._started or self._paused:
                    continue
                if consumer.channel.is_closed:  # closed by pause
                    channel = await self._job_channel()
                    consumer.queue = await self.topology.declare_model_queue(
                        channel, consumer.model
                    )
                    consumer.channel = channel
                tag = await consumer.queue.consume(self._on_message)
                await self._keep_tag(consumer, tag)
        self.state = WorkerState.READY
        await self._send_heartbeat()

    async def _unsettled_on(self, consumer: _Consumer) -> int | None:
        """Deliveries of ``consumer``'s channel not settled yet; None if that cannot be told
        now (the channel is being restored: a wait on an event, no RPC, so safe to bound)."""
        try:
            async with asyncio.timeout(self.settings.heartbeat.interval_s):
                underlay = await consumer.channel.get_underlay_channel()
        except (TimeoutError, *_TRANSPORT_ERRORS):
            return None
        return self._acks.unsettled(underlay)

    async def _cancel_consumers(self) -> None:
        """Cancel every consumer (pause, stop): their tags are forgotten at once; the cancels
        are waited for at most a heartbeat interval and otherwise left running (on a connection
        that is down, a robust channel waits for the reconnection before it cancels; jobs
        delivered meanwhile are handed back by _on_message)."""
        bound = self.settings.heartbeat.interval_s
        try:
            # A lock wait, no RPC: safe to bound. A re-subscribe that holds it longer sees the
            # new state after each of its awaits and undoes its own consumer.
            async with asyncio.timeout(bound):
                await self._subscribing.acquire()
            locked = True
        except TimeoutError:
            locked = False
        try:
            cancels = []
            for consumer in self._consumers:
                tag, consumer.tag = consumer.tag, ""
                self.resubscribe.forget(consumer.model)
                self.idle_recycle.forget(consumer.model)
                self._by_tag.pop(tag, None)
                if tag:
                    cancels.append(self._in_background(consumer.queue.cancel(tag)))
            if cancels:
                await asyncio.wait(cancels, timeout=bound)
        finally:
            if locked:
                self._subscribing.release()

    def _in_background(self, awaitable: Any) -> asyncio.Future[Any]:
        """Run an RPC of a job channel as a task that nobody cancels: a caller bounds its wait
        with asyncio.wait, never with a timeout that would cancel the RPC (aiormq then closes
        the channel, "RPC call ... cancelled", and every job running on it is requeued)."""
        task: asyncio.Future[Any] = asyncio.ensure_future(awaitable)
        self._background.add(task)

        def done(t: asyncio.Future[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled():
                t.exception()  # retrieved: a failed cancel of a dead channel is no news

        task.add_done_callback(done)
        return task

    async def _keep_tag(self, consumer: _Consumer, tag: str) -> None:
        """Store a new consumer tag, unless a pause or stop came meanwhile: then cancel it."""
        if self._started and not self._paused:
            consumer.tag = tag
            self._by_tag[tag] = consumer
            return
        await asyncio.wait(
            {self._in_background(consumer.queue.cancel(tag))},
            timeout=self.settings.heartbeat.interval_s,
        )

    # -- heartbeats ----------------------------------------------------------------------

    async def _heartbeat_exchange(self) -> AbstractExchange:
        """The heartbeats exchange on the heartbeat channel, reopened if the broker closed it.

        A plain channel, not a robust one: a robust channel would re-check the exchange before
        it reopens and stay closed while the exchange is missing; this one is simply opened
        again for the next heartbeat.
        """
        if (
            self._hb_exchange is not None
            and self._hb_channel is not None
            and not self._hb_channel.is_closed
        ):
            return self._hb_exchange
        if self._connection is None:
            raise aiormq.ChannelInvalidStateError("not connected")
        old, self._hb_channel, self._hb_exchange = self._hb_channel, None, None
        if old is not None and not old.is_closed:
            with contextlib.suppress(Exception):
                await old.close()
        # Confirms: a refused heartbeat fails its own publish (and is logged) instead of
        # passing silently while the broker closes the channel.
        channel = aio_pika.Channel(self._connection, publisher_confirms=True)
        await channel.initialize()
        self._hb_channel = channel
        self._hb_exchange = await channel.get_exchange(self.names.heartbeats, ensure=False)
        return self._hb_exchange

    async def _send_heartbeat(self) -> None:
        if self._connection is None:
            return
        hb = self.heartbeat()
        message = json_message(
            hb.model_dump_json().encode(),
            # A heartbeat older than the timeout says nothing true any more.
            expiration=self.settings.heartbeat.timeout_s,
            type="heartbeat",
            # Checked by the broker; the controller may accept only some users' heartbeats.
            user_id=amqp_user(self.url),
        )
        try:
            async with asyncio.timeout(self.settings.heartbeat.interval_s):
                exchange = await self._heartbeat_exchange()
                await exchange.publish(message, routing_key="", mandatory=False)
        except Exception as exc:  # broker outage, refusal: keep serving, the next beat will tell
            self._hb_exchange = None
            why = str(exc) or type(exc).__name__
            if self._time_to_log(f"heartbeat:{type(exc).__name__}"):
                log.warning(
                    "worker %s: heartbeat not sent: %s (logged at most once a minute per cause)",
                    self.worker_id,
                    why,
                )

    async def _heartbeat_loop(self) -> None:
        # Heartbeats only: the consumer watch runs in a task of its own, so a slow passive
        # declare or re-subscribe never delays a beat (a late beat gets a healthy worker
        # evicted).
        interval = self.settings.heartbeat.interval_s
        stuck_exit = self.settings.worker.stuck_exit_s
        while True:
            await asyncio.sleep(interval)
            if stuck_exit is not None and self.oldest_job_age_s() > stuck_exit:
                await self._exit_stuck(stuck_exit)
                return
            await self._send_heartbeat()

    async def _watch_loop(self) -> None:
        interval = self.settings.heartbeat.interval_s
        looks = 0
        while self._started:
            await asyncio.sleep(interval)
            if not self._started:
                return
            self._watching = True
            try:
                if not await self._watch_consumers():
                    return
                await self._look_for_controller()
                looks += 1
                if looks % REBIND_CONTROL_EVERY == 0:
                    await self._rebind_control()
            finally:
                self._watching = False

    async def _look_for_controller(self) -> None:
        """Warn when no controller has served the namespace for NO_CONTROLLER_WARN_LOOKS
        heartbeat intervals (at most once a minute); say so when one comes back."""
        connection = self._connection
        if connection is None or not connection.connected.is_set():
            return
        if self._looks is None:
            self._looks = QueueLooks(connection, max_age_s=0.0)
        consumers = await self._looks.consumers(self.names.unroutable)
        if consumers == QueueLooks.UNKNOWN:
            return
        now = time.monotonic()
        was_seen = self.controllers.ever_seen
        self.controllers.saw(consumers, now)
        if consumers and self._warned_unserved:
            self._warned_unserved = False
            log.info(
                "worker %s: a controller serves namespace %s %s",
                self.worker_id,
                self.names.ns,
                "again" if was_seen else "now",
            )
            return
        absent_s = self.controllers.absent_for(now)
        limit = NO_CONTROLLER_WARN_LOOKS * self.settings.heartbeat.interval_s
        if absent_s >= limit and self._time_to_log("no_controller"):
            self._warned_unserved = True
            log.warning(
                "worker %s: %s (logged at most once a minute)",
                self.worker_id,
                unserved_worker_text(self.names, list(self.models), absent_s),
            )

    def _refused(self, refusal: Refusal) -> None:
        """A controller refuses this worker's heartbeats: say why (once a minute per cause)."""
        self.refusal = refusal
        if self._time_to_log(f"refused:{refusal.cause}"):
            log.warning(
                "worker %s: a controller refuses its heartbeats (%s): %s; its queue(s) stay "
                "unbound until that changes (logged at most once a minute)",
                self.worker_id,
                refusal.cause,
                refusal.message,
            )

    async def _rebind_control(self) -> None:
        """Bind the control queue again: a ``{ns}.control`` deleted and declared again has lost
        the binding, and this worker would miss every cancel without a word."""
        connection = self._connection
        if connection is None or not connection.connected.is_set():
            return
        try:
            await self.cancels.rebind(connection, self.topology)
        except Exception as exc:
            if self._time_to_log("control_rebind"):
                log.warning(
                    "worker %s: cannot bind its control queue again (%s); cancels may not "
                    "arrive (logged at most once a minute)",
                    self.worker_id,
                    exc or type(exc).__name__,
                )

    async def _stop_watch(self) -> None:
        """End the consumer watch. Cancelled only between two looks: one cancelled inside an
        RPC of a job channel would make aiormq close that channel (its jobs requeued); a look
        under way ends by itself (it sees the stop after each await), within a bound."""
        task = self._watch_task
        if task is None:
            return
        if self._watching:
            await asyncio.wait({task}, timeout=2 * self.settings.heartbeat.interval_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _consuming(self) -> dict[_Consumer, str] | None:
        """Each consumer's look now: "ok", "missing" (its channel or tag is gone, or the queue
        does not serve it), "phantom" (the queue counts it but it holds jobs it never
        delivers: only closing its channel returns them) or "idle" (a quiet channel due for
        replacement, see :class:`IdleRecycle`). None when that cannot be told: the connection
        is down or being re-established, or a channel is being restored (aio-pika restores
        channels and consumers after; a robust connection says ``is_closed`` False meanwhile,
        ``connected`` tells)."""
        connection = self._connection
        if connection is None or connection.is_closed or not connection.connected.is_set():
            return None
        looks: dict[_Consumer, str] = {}
        now = time.monotonic()
        for consumer in self._consumers:
            if not consumer.tag:
                continue
            channel = consumer.channel
            if channel.is_closed:
                looks[consumer] = "missing"
                continue
            try:
                # Waits while aio-pika restores the channel: a wait on an event, no RPC.
                async with asyncio.timeout(self.settings.heartbeat.interval_s):
                    underlay = await channel.get_underlay_channel()
            except (TimeoutError, *_TRANSPORT_ERRORS):
                return None
            if not connection.connected.is_set():
                return None
            if underlay.is_closed:
                looks[consumer] = "missing"
                continue
            # aiormq drops a consumer from this map when the broker cancels it (queue deleted).
            if consumer.tag not in getattr(underlay, "consumers", {}):
                looks[consumer] = "missing"
                continue
            delivered = consumer.deliveries != consumer.seen
            consumer.seen = consumer.deliveries
            unsettled = self._acks.unsettled(underlay)
            if delivered:
                consumer.looks = 0
            else:
                consumer.looks += 1
            look = "ok"
            # A passive declare per model every few looks, and at every look once the model
            # is missing: one round trip per model and worker, kept off a big fleet's broker.
            if consumer.looks >= _PROBE_EVERY or (
                consumer.model in self.resubscribe.missing and not delivered
            ):
                consumer.looks = 0
                look = await self._queue_look(consumer, unsettled)
            if look == "ok" and self.idle_recycle.observe(
                consumer.model, delivered, unsettled, now
            ):
                look = "idle"
            looks[consumer] = look
        return looks

    async def _queue_look(self, consumer: _Consumer, unsettled: int) -> str:
        """What the broker's queue says of ``consumer``, which got no delivery since the last
        look: "missing" (the queue is gone or has no consumer), "phantom" (jobs ready while
        this consumer, with credit to spare, got none: a live consumer with credit would have
        had them) or "ok". It cannot see a phantom that holds all the jobs (none ready): the
        broker counts a phantom as a consumer; :class:`IdleRecycle` covers that."""
        try:
            # A plain channel, and no job channel: a robust one answers a passive declare from
            # its cache, and a timed-out RPC must never close a channel holding jobs.
            async with asyncio.timeout(self.settings.heartbeat.interval_s):
                probe = await self._probe_channel()
                declared = await probe.declare_queue(consumer.queue.name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return "missing"  # the queue is gone
        except Exception:
            return "ok"  # cannot tell now (an outage): aio-pika's recovery covers that
        result = declared.declaration_result
        if not result.consumer_count:
            return "missing"
        spare = unsettled < max(self.concurrency, self.settings.worker.prefetch)
        return "phantom" if result.message_count and spare else "ok"

    async def _probe_channel(self) -> AbstractChannel:
        if self._probe is not None and not self._probe.is_closed:
            return self._probe
        assert self._connection is not None
        self._probe = aio_pika.Channel(self._connection, publisher_confirms=False)
        await self._probe.initialize()
        return self._probe

    async def _watch_consumers(self) -> bool:
        """Re-subscribe model queues that lost their consumer, replace the channels of phantom
        and idle ones; False once it gave up (the worker then exits)."""
        if not self._started or self._paused:
            return True
        looks = await self._consuming()
        if looks is None:
            # An outage is aio-pika's to recover: it counts toward no give-up, and the watch
            # starts afresh once the connection is back.
            for model in self.resubscribe.missing:
                self.resubscribe.forget(model)
            return True
        now = time.monotonic()
        due: list[tuple[_Consumer, str]] = []
        for consumer, look in looks.items():
            action = self.resubscribe.observe(consumer.model, look in ("ok", "idle"), now)
            if action == ResubscribePolicy.GIVE_UP:
                await self._exit_unconsumed(consumer.model)
                return False
            if look == "idle" or action == ResubscribePolicy.RETRY:
                due.append((consumer, look))
        lost = [c for c, look in due if look != "idle"]
        if lost and self._time_to_log("resubscribe"):
            log.warning(
                "worker %s: nothing consumes %s for this worker any more (queue deleted or "
                "channel closed); subscribing again (logged at most once a minute)",
                self.worker_id,
                ", ".join(self.names.model_queue(c.model) for c in lost),
            )
        for consumer, look in due:
            try:
                await self._resubscribe(consumer, look)
            except Exception as exc:
                log.info("worker %s: subscribing again failed: %s", self.worker_id, exc)
        return True

    async def _resubscribe(self, consumer: _Consumer, why: str) -> None:
        """Consume ``consumer``'s queue again (re-declared, with the same arguments as ever).

        ``why`` is the watch's look. "phantom", or a closed channel: on a new channel of its
        own, the old one closed after (which returns what a phantom held; only this model's
        jobs run on it). "idle": the old consumer is cancelled first, so no job can reach the
        old channel while it closes; if one arrived meanwhile (a live consumer after all) the
        queue is consumed again on the same channel instead. Otherwise ("missing") on the same
        channel, the old tag cancelled first so aio-pika's own recovery adds no second one.

        No RPC here is bounded by a timeout (a cancelled RPC closes its job channel): a
        broker that does not answer holds this watch, not the heartbeats, and the worker
        gives up after ``resubscribe.give_up_s`` at the latest once it answers again. Pause and
        stop take the same lock; after each await the state is checked again."""
        async with self._subscribing:
            if not self._started or self._paused or not consumer.tag:
                return
            old_tag, old_channel = consumer.tag, consumer.channel
            bound = self.settings.heartbeat.interval_s
            cancelled = False
            replace = why in ("phantom", "idle") or old_channel.is_closed
            if replace:
                channel = await self._job_channel()
                # Declared once on a fresh channel: tracked, so aio-pika restores the consumer
                # after a reconnect.
                queue = await self.topology.declare_model_queue(channel, consumer.model)
            if why == "idle" and not old_channel.is_closed:
                # The new channel is ready first: the queue goes without a consumer for the
                # cancel and the consume only.
                await asyncio.wait(
                    {self._in_background(consumer.queue.cancel(old_tag))}, timeout=bound
                )
                cancelled = True
                if await self._unsettled_on(consumer) != 0:  # a job came: keep the channel
                    self._in_background(channel.close())
                    replace = False
            if not replace:
                channel = old_channel
                if not cancelled:
                    await asyncio.wait(
                        {self._in_background(consumer.queue.cancel(old_tag))}, timeout=bound
                    )
                # Untracked: a robust channel would keep (and restore) one queue object per
                # re-declare.
                queue = await self.topology.declare_model_queue(
                    channel, consumer.model, track=False
                )
            if not self._started or self._paused:
                if replace:
                    self._in_background(channel.close())
                return
            tag = await queue.consume(self._on_message)
            self._by_tag.pop(old_tag, None)
            consumer.queue, consumer.channel = queue, channel
            consumer.deliveries = consumer.seen = consumer.looks = 0
            consumer.tag = ""
            await self._keep_tag(consumer, tag)
            self.idle_recycle.forget(consumer.model)
            if replace:
                # Stops aio-pika's own attempts to restore it; a phantom's jobs go back.
                self._in_background(old_channel.close())
            # An idle queue's channel is renewed every minute or so: not worth a log line.
            log.log(
                logging.DEBUG if why == "idle" else logging.INFO,
                "worker %s consumes %s again (%s)%s",
                self.worker_id,
                queue.name,
                why,
                " on a new channel" if replace else "",
            )

    async def _exit_unconsumed(self, model: str) -> None:
        log.error(
            "worker %s: could not consume %s again for %.0fs; exiting so a supervisor restarts it",
            self.worker_id,
            self.names.model_queue(model),
            self.resubscribe.give_up_s,
        )
        self.state = WorkerState.STOPPING
        await self._send_heartbeat()
        self.on_stuck()

    async def _exit_stuck(self, limit_s: float) -> None:
        """A job outlived ``worker.stuck_exit_s``: say so, then leave so the broker requeues.

        A handler running in a thread cannot be cancelled, so the process is the unit of
        recovery: exiting closes the connection and every job it held goes back to its queue.
        """
        log.error(
            "worker %s: a job has run %.0fs (> worker.stuck_exit_s=%.0fs); exiting so its jobs "
            "are requeued",
            self.worker_id,
            self.oldest_job_age_s(),
            limit_s,
        )
        self._stop_reason = "stuck"
        self.state = WorkerState.STOPPING
        await self._send_heartbeat()
        self.on_stuck()

    # -- jobs ----------------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # The consumer watch: a consumer that gets jobs is alive (per consumer, so one model's
        # traffic never vouches for another's).
        consumer = self._by_tag.get(message.consumer_tag or "")
        if consumer is not None:
            consumer.deliveries += 1
        if message.delivery_tag is not None:
            self._acks.delivered(message.channel, message.delivery_tag)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        began = False
        handback: asyncio.Future[None] | None = None
        try:
            async with self._slots:
                if not self._started or self._paused:
                    # Stopping or paused: the job never started; another worker runs it.
                    handback = self._hand_back(message)
                    await asyncio.shield(handback)
                    return
                began = True
                await self._process(message)
        except asyncio.CancelledError:
            if _channel_of(message) is None or handback is not None:
                # aiormq cancels the consumer tasks of a channel that closed: the broker has
                # requeued the job with it, nothing is left to settle (the batcher forgets
                # closed channels itself). A hand-back under way settles the job itself: a
                # second one would run the job twice.
                raise
            # Stop grace ran out: give the job back so another worker runs it. One that ran
            # is returned to the broker (which counts the delivery); one that only waited for
            # a slot is handed back without spending its delivery limit.
            if began:
                self.counters["requeued"] += 1
                await self._settle(message, requeue=True)
            else:
                await asyncio.shield(self._hand_back(message))
            raise
        finally:
            if task is not None:
                self._tasks.discard(task)

    def _queue_of(self, message: AbstractIncomingMessage) -> str | None:
        """The model queue a delivery came from: its routing key is the model (through the
        jobs exchange) or the queue's name (a job handed back through the default exchange)."""
        key = message.routing_key or ""
        if key in self.models:
            return self.names.model_queue(key)
        if key in self._queue_names:
            return key
        consumer = self._by_tag.get(message.consumer_tag or "")
        return consumer.queue.name if consumer is not None else None

    def _hand_back(self, message: AbstractIncomingMessage) -> asyncio.Future[None]:
        """Return a job that never started without spending its delivery limit.

        A nack with requeue counts as a delivery on a quorum queue (x-delivery-limit), so a
        rolling restart would dead-letter jobs that never ran. Instead the job is republished
        to its model queue (confirmed, same body and properties, expiring when the producer's
        deadline passes, no delivery count) and the original acked; if that fails, it is
        nacked as before. Returns the hand-back's task, which the caller awaits shielded: a
        stop that cancels the caller while it waits for the confirm must neither requeue the
        original nor hand it back again.
        """
        task = asyncio.ensure_future(self._republish_and_settle(message))
        self._handbacks.add(task)
        task.add_done_callback(self._handbacks.discard)
        return task

    async def _republish_and_settle(self, message: AbstractIncomingMessage) -> None:
        if await self._republish(message):
            self.counters["handed_back"] += 1
            await self._settle(message)
        else:
            self.counters["requeued"] += 1
            await self._settle(message, requeue=True)

    async def _republish(self, message: AbstractIncomingMessage) -> bool:
        queue = self._queue_of(message)
        channel = self._dead_channel
        if queue is None or channel is None or _channel_of(message) is None:
            # A closed delivery channel: the broker has requeued the job already.
            return False
        copy = aio_pika.Message(
            message.body,
            headers=handback_headers(message.headers),
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            delivery_mode=message.delivery_mode,
            priority=message.priority,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            expiration=handback_expiration(message.headers, message.expiration, time.time()),
            message_id=message.message_id,
            timestamp=message.timestamp,
            type=message.type,
            app_id=message.app_id,
        )
        try:
            async with asyncio.timeout(_HANDBACK_TIMEOUT_S):
                # mandatory: a queue deleted meanwhile returns the copy (DeliveryError), so the
                # original is nacked instead of acked into nowhere.
                await channel.default_exchange.publish(copy, routing_key=queue, mandatory=True)
        except Exception as exc:
            if self._time_to_log(f"handback:{type(exc).__name__}"):
                log.info(
                    "worker %s: job %s not republished (%s); requeued instead (logged at most "
                    "once a minute per cause)",
                    self.worker_id,
                    message.message_id,
                    str(exc) or type(exc).__name__,
                )
            return False
        return True

    def _parse(self, message: AbstractIncomingMessage) -> Job:
        model = message.routing_key or ""
        job_id = message.message_id or message.correlation_id or "?"
        if len(message.body) > self.settings.worker.max_payload_bytes:
            raise _Failure(
                ErrorCode.INVALID_JOB,
                DeadReason.INVALID,
                f"job body is {len(message.body)} bytes, above worker.max_payload_bytes "
                f"({self.settings.worker.max_payload_bytes})",
                cause="too_large",
            )
        if message.content_type not in (None, "", "application/json"):
            raise _Failure(
                ErrorCode.INVALID_JOB,
                DeadReason.INVALID,
                f"content type {message.content_type!r} is not application/json",
                cause="content_type",
            )
        try:
            request = JobRequest.model_validate_json(message.body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise _Failure(
                ErrorCode.INVALID_JOB,
                DeadReason.INVALID,
                f"invalid job: {where}: {first['msg']}",
                cause="not_json" if first["type"] == "json_invalid" else "schema",
            ) from None
        if model and request.model != model and request.model not in self.models:
            raise _Failure(
                ErrorCode.INVALID_JOB,
                DeadReason.INVALID,
                f"job names model {request.model!r} but came from the queue of {model!r}",
                cause="wrong_model",
            )
        if message.reply_to and not is_direct_reply_to(message.reply_to):
            # Replies through the default exchange would land in whatever queue reply_to
            # names (the catalog, another model's queue): refuse the job before it runs.
            self.counters["reply_refused"] += 1
            raise _Failure(
                ErrorCode.INVALID_JOB,
                DeadReason.INVALID,
                f"reply_to {message.reply_to[:100]!r} is not a direct reply-to address "
                "(amq.rabbitmq.reply-to)",
                cause="reply_to",
            )
        headers = message.headers or {}
        count = headers.get("x-delivery-count")
        # A first delivery is attempt 1 whatever its headers say: a producer can set
        # x-delivery-count itself, and the broker only overwrites it on a redelivery.
        if not message.redelivered:
            attempt = 1
        else:
            attempt = int(count) + 1 if isinstance(count, int) and count > 0 else 2
        return Job(
            job_id=job_id,
            model=request.model,
            payload=request.payload,
            deadline=request.deadline,
            stream=request.stream,
            attempt=attempt,
            sent_at=request.sent_at,
        )

    async def _process(self, message: AbstractIncomingMessage) -> None:
        model = message.routing_key or (self.models[0] if len(self.models) == 1 else "?")
        job_id = message.message_id or message.correlation_id or "?"
        started = time.monotonic()
        attempt_id = f"{self._attempt_prefix}{next(self._attempt_numbers):x}"
        self._running[attempt_id] = started
        failure: _Failure | None = None
        cancelled = False
        lost: _ReplyLost | None = None
        result: Any = None
        chunks = 0
        try:
            job = self._parse(message)
            model = job.model
            self.cancels.check(job)  # cancelled while it waited: never started
            if job.sent_at is not None:
                self.stats.job_started(model, time.time() - job.sent_at)
            remaining = job.remaining()
            if remaining is not None and remaining <= 0:
                raise _Failure(
                    ErrorCode.EXPIRED,
                    DeadReason.EXPIRED,
                    "the producer's deadline passed before a worker could start the job",
                )
            result, chunks = await self.cancels.run(
                job_id, self._run_handler(job, message, attempt_id)
            )
        except JobCancelled:
            cancelled = True
        except _ReplyLost as caught:
            lost = caught
        except _Failure as caught:
            failure = caught
        except InvalidJobError as exc:
            failure = _Failure(ErrorCode.INVALID_JOB, DeadReason.INVALID, exc.message)
        except JobError as exc:  # a handler failing with a code of its own (modelfleet.upstream)
            failure = _Failure(
                exc.code, _DEAD_REASON_OF.get(exc.code, DeadReason.WORKER_ERROR), exc.message
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The traceback once a minute per exception type and model: a handler that fails on
            # every job must not flood the log (each failure is counted and dead-lettered).
            if self._time_to_log(f"raised:{type(exc).__name__}:{model}"):
                log.exception(
                    "worker %s: handler failed on job %s (%s); the traceback is logged at most "
                    "once a minute per exception type and model",
                    self.worker_id,
                    job_id,
                    model,
                )
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            failure = _Failure(
                ErrorCode.WORKER_ERROR, DeadReason.WORKER_ERROR, f"handler raised {text}"
            )
        finally:
            self._running.pop(attempt_id, None)
        if lost is not None:
            await self._lost(message, job_id, lost)
            return
        if cancelled:
            # The producer is gone: no answer, no error copy; ack and free the slot.
            self.counters["cancelled"] += 1
            await self._settle(message)
            return
        if failure is None:
            reply = ResultReply(
                result=result,
                worker_id=self.worker_id,
                duration_s=time.monotonic() - started,
                chunks=chunks,
                attempt_id=attempt_id,
            )
            try:
                await self._reply(message, reply)
            except _ReplyLost as caught:
                await self._lost(message, job_id, caught)
                return
            except (TypeError, ValueError) as exc:  # the handler returned something not JSON-able
                failure = _Failure(
                    ErrorCode.WORKER_ERROR,
                    DeadReason.WORKER_ERROR,
                    f"handler result is not JSON-serialisable: {exc}",
                )
        self._account(model, failure, time.monotonic() - started)
        if failure is not None:
            await self._fail(message, model, job_id, failure)
            return
        await self._settle(message)

    def _account(self, model: str, failure: _Failure | None, duration_s: float) -> None:
        """Count a finished job in the heartbeat's counters and per-model statistics."""
        if failure is None:
            counter, outcome = "ok", Outcome.OK
        elif failure.reason == DeadReason.INVALID:
            counter, outcome = "invalid", Outcome.INVALID
        elif failure.code in (ErrorCode.EXPIRED, ErrorCode.WORKER_TIMEOUT):
            counter, outcome = "expired", Outcome.TIMEOUT
        else:
            counter, outcome = "worker_error", Outcome.WORKER_ERROR
        self.counters[counter] += 1
        self.stats.job_done(model, outcome, duration_s)

    async def _run_handler(
        self, job: Job, message: AbstractIncomingMessage, attempt_id: str
    ) -> tuple[Any, int]:
        """Run the handler; returns (result, chunks sent)."""
        if self._kind == _HandlerKind.ASYNC:
            return await self._bounded(self.handler(job), job), 0
        if self._kind == _HandlerKind.THREAD:
            # A thread cannot be cancelled: it holds its slot until it returns, and shows up in
            # heartbeats as a stuck job if it never does.
            return await asyncio.to_thread(self.handler, job), 0
        streamed: tuple[Any, int] = await self._bounded(self._stream(job, message, attempt_id), job)
        return streamed

    async def _bounded(self, awaitable: Any, job: Job) -> Any:
        remaining = job.remaining()
        if remaining is None:
            return await awaitable
        try:
            async with asyncio.timeout(remaining):
                return await awaitable
        except TimeoutError:
            raise _Failure(
                ErrorCode.WORKER_TIMEOUT,
                DeadReason.EXPIRED,
                "the handler did not finish before the producer's deadline",
            ) from None

    async def _stream(
        self, job: Job, message: AbstractIncomingMessage, attempt_id: str
    ) -> tuple[Any, int]:
        items: AsyncIterator[Any]
        if self._kind == _HandlerKind.ASYNC_GEN:
            items = self.handler(job)
        else:
            items = _iterate_in_thread(self.handler(job))
        seq = 0
        collected: list[Any] = []
        final: Any = None
        has_final = False
        async for item in items:
            if isinstance(item, Final):
                final, has_final = item.value, True
                break
            if job.stream:
                # The first chunk goes out at once: time to first token is what a user waits on.
                chunk = ChunkReply(seq=seq, data=item, attempt_id=attempt_id)
                await self._reply(message, chunk, flush=seq == 0)
                if seq == 0 and job.sent_at is not None:
                    # Time to first chunk as the producer sees it: from publish, queue included.
                    self.stats.first_chunk(job.model, time.time() - job.sent_at)
            else:
                collected.append(item)
            seq += 1
        if isinstance(items, _ThreadIterator) and items.returned is not None and not has_final:
            final, has_final = items.returned, True
        if not has_final and not job.stream:
            final = collected
        return final, seq if job.stream else 0

    async def _reply(
        self, message: AbstractIncomingMessage, reply: BaseModel, *, flush: bool = False
    ) -> None:
        """Publish ``reply`` on the channel the job came in on. Raises :class:`_ReplyLost` if
        that channel is gone: the delivery went back to the queue with it, so the job will run
        again, and this attempt must neither go on streaming nor be answered or acked."""
        if not message.reply_to or not is_direct_reply_to(message.reply_to):
            return  # no reply wanted, or an address refused in _parse
        body = reply.model_dump_json().encode()
        properties = reply_properties(
            message.correlation_id or message.message_id, getattr(reply, "kind", "reply")
        )
        channel = _channel_of(message)
        if channel is None:
            raise _ReplyLost(f"the channel of the delivery is closed ({type(reply).__name__})")
        try:
            # On the delivery's own channel, never its successor; a channel that started
            # closing raises, and no frame of it follows its CloseOk (which would make the
            # broker close the whole connection): see modelfleet.publishing.
            await publish_on(
                channel, body, properties, exchange="", routing_key=message.reply_to, flush=flush
            )
        except _TRANSPORT_ERRORS as exc:
            raise _ReplyLost(str(exc) or type(exc).__name__) from exc

    def _time_to_log(self, cause: str) -> bool:
        """True at most once every LOG_CAUSE_EVERY_S per ``cause``: a fault that hits every job
        is logged, not repeated per job (each job is still counted and dead-lettered)."""
        now = time.monotonic()
        logged = self._logged_causes.get(cause)
        if logged is not None and now - logged < LOG_CAUSE_EVERY_S:
            return False
        self._logged_causes[cause] = now
        return True

    async def _fail(
        self, message: AbstractIncomingMessage, model: str, job_id: str, failure: _Failure
    ) -> None:
        """Error reply to the producer, copy to the error queue with the reason, then ack."""
        if self._time_to_log(failure.cause):
            # "reason" is the error queue's word; the cause, when finer, follows it.
            why = (
                failure.reason
                if failure.cause == failure.reason
                else (f"{failure.reason}, {failure.cause}")
            )
            log.warning(
                "job %s for model %s failed with %s (%s): %s (logged at most once a minute "
                "per cause)",
                job_id,
                model,
                failure.code.name,
                why,
                failure.message,
            )
        try:
            await self._reply(
                message, ErrorReply.build(failure.code, failure.message, model=model, job_id=job_id)
            )
        except _ReplyLost as caught:
            # The delivery is gone with its channel: the attempt that gets it next fails (or
            # not) on its own and copies then; a copy now would be a second one.
            await self._lost(message, job_id, caught)
            return
        except Exception as exc:
            log.debug("job %s: error reply not sent: %s", job_id, exc)
        copy = dead_copy(message, reason=failure.reason, error=failure.message, model=model)
        try:
            assert self._dead_exchange is not None
            await self._dead_exchange.publish(copy, routing_key=model, mandatory=False)
        except Exception as exc:
            # Fall back to the broker's own dead-lettering (reason "rejected").
            log.warning("job %s: copy to the error queue failed (%s); rejecting", job_id, exc)
            await self._settle(message, reject=True)
            return
        await self._settle(message)

    async def _lost(self, message: AbstractIncomingMessage, job_id: str, lost: _ReplyLost) -> None:
        """A reply could not be sent because the delivery's channel is gone: no error reply, no
        error copy, no ack — the broker redelivers the job. Counted in the heartbeat's
        ``reply_lost``."""
        self.counters["reply_lost"] += 1
        if self._time_to_log("reply_lost"):
            log.warning(
                "worker %s: reply to job %s lost with its channel (%s); the broker redelivers "
                "the job (logged at most once a minute; %d so far)",
                self.worker_id,
                job_id,
                lost,
                self.counters["reply_lost"],
            )
        if message.delivery_tag is not None and _channel_of(message) is not None:
            # The publish failed on a channel still open: give the job back explicitly.
            await self._settle(message, requeue=True)

    async def _settle(
        self, message: AbstractIncomingMessage, *, requeue: bool = False, reject: bool = False
    ) -> None:
        tag = message.delivery_tag
        channel = _channel_of(message)
        if tag is None or channel is None:
            # The delivery's channel died: the broker has already requeued the job, and an ack
            # on the new channel would be for a delivery tag it never issued.
            return
        if not requeue and not reject:
            self._acks.ack(channel, tag)  # batched: written on the next loop turn
            return
        try:
            # Through the batcher, so no multiple ack can overtake this frame (modelfleet.acks).
            if requeue:
                await self._acks.nack(channel, tag)
            else:
                await self._acks.reject(channel, tag)
        except Exception as exc:
            # The delivery's channel died: the broker has already requeued the job, and an ack
            # on the new channel would be for a delivery tag it never issued.
            log.info("job %s: not settled (%s); the broker requeued it", message.message_id, exc)


def _channel_of(message: AbstractIncomingMessage) -> aiormq.abc.AbstractChannel | None:
    """The channel a delivery came on, or None once it is closed (aio-pika then raises)."""
    try:
        return message.channel
    except aiormq.ChannelInvalidStateError:
        return None


class _ThreadIterator:
    """Drive a plain generator from a thread, one item at a time."""

    def __init__(self, iterator: Iterator[Any]) -> None:
        self._iterator = iterator
        self.returned: Any = None

    def __aiter__(self) -> _ThreadIterator:
        return self

    def _next(self) -> Any:
        try:
            return next(self._iterator)
        except StopIteration as stop:
            self.returned = stop.value
            return _STREAM_END

    async def __anext__(self) -> Any:
        item = await asyncio.to_thread(self._next)
        if item is _STREAM_END:
            raise StopAsyncIteration
        return item


def _iterate_in_thread(iterator: Iterator[Any]) -> _ThreadIterator:
    return _ThreadIterator(iterator)


EXIT_STUCK = 75  # EX_TEMPFAIL: a supervisor should restart the worker


def _exit_process() -> None:
    logging.shutdown()
    os._exit(EXIT_STUCK)
