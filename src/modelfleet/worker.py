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
a channel of their own. A model queue whose consumer is gone (queue deleted, channel closed) is
consumed again within seconds, the heartbeats saying ``draining`` meanwhile, or the worker exits
(see :class:`ResubscribePolicy`).
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
from modelfleet.config import Settings
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

__all__ = ["Handler", "ResubscribePolicy", "Worker", "handback_expiration", "handback_headers"]

log = logging.getLogger(__name__)

Handler = Callable[[Job], Any]

_STREAM_END = object()
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


class _ReplyLost(Exception):
    """Internal: a reply could not be published because the delivery's channel is gone."""


@dataclass
class _Consumer:
    """One model queue this worker consumes (``tag`` "" while paused)."""

    model: str
    queue: AbstractQueue
    tag: str = ""


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
            defaults when omitted.
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
        self.settings = settings or Settings()
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
        self._channel: AbstractChannel | None = None
        self._dead_channel: AbstractChannel | None = None
        # Heartbeats have a channel of their own: a heartbeat the broker refuses (user_id,
        # missing exchange) closes that channel only, never the one holding the running jobs.
        self._hb_channel: AbstractChannel | None = None
        self._hb_exchange: AbstractExchange | None = None
        self._probe: AbstractChannel | None = None  # the consumer watch's passive declares
        self._deliveries = 0
        self._deliveries_seen = 0
        self._phantoms: set[str] = set()  # consumer tags the channel has, the queue does not serve
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
        )
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
        self._connection = await connect(self.settings.amqp, role="worker", url=self.url)
        self._channel = await self._job_channel()
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
            queue = await self.topology.declare_model_queue(self._channel, model)
            tag = "" if self._paused else await queue.consume(self._on_message)
            self._consumers.append(_Consumer(model, queue, tag))

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
        # Bounded: on a connection that is down, a robust channel waits for the reconnection
        # before it cancels, and a stop must never wait for that (jobs delivered meanwhile are
        # handed back by _on_message).
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.settings.heartbeat.interval_s):
                for consumer in self._consumers:
                    with contextlib.suppress(Exception):
                        await consumer.queue.cancel(consumer.tag)
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
        if self._hb_task is not None:
            self._hb_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._hb_task
        await self._acks.aclose()
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
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.settings.heartbeat.interval_s):
                for consumer in self._consumers:
                    tag, consumer.tag = consumer.tag, ""
                    self.resubscribe.forget(consumer.model)
                    if tag:
                        await consumer.queue.cancel(tag)
        await self._send_heartbeat()

    async def resume(self) -> None:
        """Take jobs again after :meth:`pause` (state ``ready``)."""
        if not self._paused or self._stop_requested.is_set():
            return
        self._paused = False
        for consumer in self._consumers:
            if not consumer.tag:
                consumer.tag = await consumer.queue.consume(self._on_message)
        self.state = WorkerState.READY
        await self._send_heartbeat()

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
        interval = self.settings.heartbeat.interval_s
        stuck_exit = self.settings.worker.stuck_exit_s
        while True:
            await asyncio.sleep(interval)
            if stuck_exit is not None and self.oldest_job_age_s() > stuck_exit:
                await self._exit_stuck(stuck_exit)
                return
            if not await self._watch_consumers():
                return
            await self._send_heartbeat()

    async def _consuming(self) -> set[str] | None:
        """Consumer tags live on the job channel now; None when that cannot be told (the
        connection is being re-established: aio-pika restores everything after)."""
        channel, connection = self._channel, self._connection
        if channel is None or connection is None or connection.is_closed:
            return None
        if channel.is_closed:
            return set()
        try:
            async with asyncio.timeout(self.settings.heartbeat.interval_s):
                underlay = await channel.get_underlay_channel()
        except (TimeoutError, *_TRANSPORT_ERRORS):
            return None
        if underlay.is_closed:
            return set()
        # aiormq drops a consumer from this map when the broker cancels it (queue deleted).
        consumers: Mapping[str, Any] = getattr(underlay, "consumers", {})
        live = set(consumers)
        delivered = self._deliveries != self._deliveries_seen
        self._deliveries_seen = self._deliveries
        self._phantoms = set()
        for consumer in self._consumers:
            if consumer.tag in live and not await self._queue_serves_us(consumer, delivered):
                live.discard(consumer.tag)
                self._phantoms.add(consumer.tag)
        return live

    async def _queue_serves_us(self, consumer: _Consumer, delivered: bool) -> bool:
        """Does the broker's queue agree that we consume it? RabbitMQ 3.10 sends no cancel when
        a quorum queue is deleted and at once declared again: the channel keeps a consumer the
        new queue does not know. The queue then shows no consumer, or jobs left ready while
        this worker, with prefetch to spare, got no delivery since the last look (a live
        consumer with credit would have had them)."""
        try:
            async with asyncio.timeout(self.settings.heartbeat.interval_s):
                probe = await self._probe_channel()
                # A plain channel: a robust one answers a passive declare from its cache.
                declared = await probe.declare_queue(consumer.queue.name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False  # the queue is gone
        except Exception:
            return True  # cannot tell now (an outage): aio-pika's recovery covers that
        result = declared.declaration_result
        if not result.consumer_count:
            return False
        spare = len(self._tasks) < max(self.concurrency, self.settings.worker.prefetch)
        return delivered or not (result.message_count and spare)

    async def _probe_channel(self) -> AbstractChannel:
        if self._probe is not None and not self._probe.is_closed:
            return self._probe
        assert self._connection is not None
        self._probe = aio_pika.Channel(self._connection, publisher_confirms=False)
        await self._probe.initialize()
        return self._probe

    async def _watch_consumers(self) -> bool:
        """Re-subscribe model queues that lost their consumer; False once it gave up (the
        worker then exits)."""
        if not self._started or self._paused:
            return True
        live = await self._consuming()
        if live is None:
            return True
        now = time.monotonic()
        due: list[_Consumer] = []
        for consumer in self._consumers:
            if not consumer.tag:
                continue
            action = self.resubscribe.observe(consumer.model, consumer.tag in live, now)
            if action == ResubscribePolicy.GIVE_UP:
                await self._exit_unconsumed(consumer.model)
                return False
            if action == ResubscribePolicy.RETRY:
                due.append(consumer)
        if due:
            if self._time_to_log("resubscribe"):
                log.warning(
                    "worker %s: nothing consumes %s for this worker any more (queue deleted or "
                    "channel closed); subscribing again (logged at most once a minute)",
                    self.worker_id,
                    ", ".join(self.names.model_queue(c.model) for c in due),
                )
            try:
                async with asyncio.timeout(self.settings.heartbeat.interval_s * 4):
                    await self._resubscribe(due)
            except Exception as exc:
                log.info("worker %s: subscribing again failed: %s", self.worker_id, exc)
        return True

    async def _resubscribe(self, consumers: list[_Consumer]) -> None:
        """Consume these queues again (re-declared, with the same arguments as ever). If the
        job channel itself is closed and aio-pika has not reopened it, a new channel replaces
        it for every consumer."""
        assert self._channel is not None
        # A consumer the channel has but the queue does not serve holds the jobs the queue gave
        # it (unacked, never delivered): only closing its channel returns them.
        replaced = self._channel.is_closed or any(c.tag in self._phantoms for c in consumers)
        if replaced:
            old, self._channel = self._channel, await self._job_channel()
            with contextlib.suppress(Exception):
                await old.close()  # stops aio-pika's own attempts to restore it
            consumers = [c for c in self._consumers if c.tag]
        for consumer in consumers:
            if not replaced:
                # Forget the old tag so aio-pika's own recovery adds no second consumer.
                with contextlib.suppress(Exception):
                    await consumer.queue.cancel(consumer.tag)
            queue = await self.topology.declare_model_queue(self._channel, consumer.model)
            consumer.tag = await queue.consume(self._on_message)
            consumer.queue = queue
            log.info("worker %s consumes %s again", self.worker_id, queue.name)

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
        self._deliveries += 1  # the consumer watch: a consumer that gets jobs is alive
        if message.delivery_tag is not None:
            self._acks.delivered(message.channel, message.delivery_tag)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        began = False
        try:
            async with self._slots:
                if not self._started or self._paused:
                    # Stopping or paused: the job never started; another worker runs it.
                    await self._hand_back(message)
                    return
                began = True
                await self._process(message)
        except asyncio.CancelledError:
            if _channel_of(message) is None:
                # aiormq cancels the consumer tasks of a channel that closed: the broker has
                # requeued the job with it, nothing is left to settle (the batcher forgets
                # closed channels itself).
                raise
            # Stop grace ran out: give the job back so another worker runs it. One that ran
            # is returned to the broker (which counts the delivery); one that only waited for
            # a slot is handed back without spending its delivery limit.
            if began:
                self.counters["requeued"] += 1
                await self._settle(message, requeue=True)
            else:
                await self._hand_back(message)
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
        for consumer in self._consumers:
            if consumer.tag and consumer.tag == message.consumer_tag:
                return consumer.queue.name
        return None

    async def _hand_back(self, message: AbstractIncomingMessage) -> None:
        """Return a job that never started without spending its delivery limit.

        A nack with requeue counts as a delivery on a quorum queue (x-delivery-limit), so a
        rolling restart would dead-letter jobs that never ran. Instead the job is republished
        to its model queue (confirmed, same body and properties, expiring when the producer's
        deadline passes, no delivery count) and the original acked; if that fails, it is
        nacked as before. The republish is shielded: a stop that cancels this task while it
        waits for the confirm must not also requeue the original.
        """
        self.counters["requeued"] += 1
        task = asyncio.ensure_future(self._republish_and_settle(message))
        self._handbacks.add(task)
        task.add_done_callback(self._handbacks.discard)
        await asyncio.shield(task)

    async def _republish_and_settle(self, message: AbstractIncomingMessage) -> None:
        if await self._republish(message):
            self.counters["handed_back"] += 1
            await self._settle(message)
        else:
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
            log.warning(
                "job %s (%s) failed: %s (%s): %s (logged at most once a minute per cause)",
                job_id,
                model,
                failure.reason,
                failure.cause,
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
