"""The producer's client: submit jobs, get results or streams, or an error named for its cause.

>>> async with Client(url="amqp://guest:guest@127.0.0.1/", namespace="modelfleet") as client:
...     result = await client.submit("llama", {"prompt": "hi"}, timeout=30)
...     async with client.stream("llama", {"prompt": "hi there"}) as stream:
...         async for chunk in stream:
...             print(chunk)
...     print(stream.result)

One connection and one channel carry any number of concurrent jobs: replies come back over
RabbitMQ's direct reply-to (no queue per request, no lock per request) and are matched by
correlation id. Every job carries its deadline as the message's expiration, so a job whose
producer gave up is never run later.

A job abandoned before its answer — :meth:`Client.cancel`, a ``submit`` task cancelled, a
:class:`JobStream` closed (``async with``, :meth:`JobStream.aclose`) or broken out of — is
cancelled on the workers too (see :mod:`modelfleet.cancel`): not started if still queued, its
handler stopped if running. Only this client can cancel its jobs: a job's id is the hash of a
key derived from a secret of this client, and a cancel must carry that key.

Faults (README, failure behaviour):

* The channel closed (a channel error, or the connection lost): jobs the broker had confirmed
  fail at once with ``CONNECTION_LOST`` (their answers would come back on the dead channel);
  jobs not confirmed yet are published again once the channel is back, within their timeout.
  The client re-arms itself after the robust channel reopens, whatever closed it; should the
  channel stay closed while the connection is up (a failed reopen), a watchdog reopens it.
  A job reported ``CONNECTION_LOST`` is cancelled on the workers (best effort).
* The broker refuses the publish itself (no write permission on ``{ns}.jobs``, say): the job
  fails at once with :class:`~modelfleet.errors.BrokerError` naming the user and exchange; it
  is not retried (a retry would only close the channel again).
* The jobs exchange does not exist (deleted): the job fails at once with ``NO_WORKER`` naming
  the exchange (and is cancelled, in case an earlier attempt was queued); the client serves
  again as soon as it exists.
* A stream whose job restarted on another worker after chunks reached the caller ends with
  :class:`~modelfleet.errors.StreamRestartedError` (50009) and the new attempt is cancelled:
  the chunks of two attempts are never spliced.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from pydantic import ValidationError

from modelfleet.cancel import CancelPublisher, cancel_key, job_id_for
from modelfleet.config import Settings, load_settings
from modelfleet.connections import connect
from modelfleet.errors import (
    BrokerError,
    ConnectionLostError,
    ErrorCode,
    InvalidJobError,
    InvalidModelError,
    JobError,
    JobTimeoutError,
    NoWorkerError,
    OverloadedError,
    StreamRestartedError,
    error_for_code,
)
from modelfleet.messages import (
    ChunkReply,
    ErrorReply,
    JobRequest,
    ResultReply,
    check_model_name,
    parse_reply,
)
from modelfleet.presence import (
    LOOK_MAX_AGE_S,
    ControllerWatch,
    QueueLooks,
    no_controller_text,
    stranded_text,
)
from modelfleet.publishing import closing, job_properties, publish_on
from modelfleet.security import declare_where_allowed
from modelfleet.topology import DEADLINE_HEADER, Names, Topology

__all__ = ["Client", "JobStream"]

log = logging.getLogger(__name__)

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
# Pause between publish attempts while the connection is down (the robust connection retries
# every amqp.reconnect_interval_s; this only decides how soon after it we notice).
_REPUBLISH_PAUSE_S = 0.1
# Pause before consuming replies again when that failed on a channel that is still open.
_REARM_PAUSE_S = 0.5
# The watchdog reopens a channel still closed this long after amqp.reconnect_interval_s
# (aio-pika's own reopen comes well within it), and logs a persistent failure at most so often.
_WATCHDOG_GRACE_S = 2.0
_WATCHDOG_LOG_EVERY_S = 30.0
# The PRECONDITION_FAILED that a job's body above the broker's max_message_size gets (final).
_MESSAGE_TOO_BIG = "larger than configured max size"

# A controller this client saw is given at least this long to come back before its absence
# fails jobs at once (modelfleet.presence.ControllerWatch).
CONTROLLER_GRACE_S = 10.0

_Reply = ResultReply | ChunkReply | ErrorReply


class _Lost:
    """Queued for a job whose publish was confirmed on a channel that then closed: its answer
    would come back on that channel, so it cannot arrive (internal)."""

    __slots__ = ("cause", "epoch")

    def __init__(self, cause: str, epoch: int) -> None:
        self.cause = cause
        self.epoch = epoch


class _Closed:
    """Queued for each pending job when the client closes (internal)."""


_CLOSED = _Closed()


def _closed_error() -> BrokerError:
    return BrokerError("client is closed: use it inside 'async with Client(...)'")


class Client:
    """Submits jobs to a modelfleet namespace.

    Keywords:
        settings: ``amqp.*``, ``namespace``, ``client.timeout_s``, ``worker.max_payload_bytes``;
            when omitted, :func:`~modelfleet.config.load_settings` reads them as the commands
            do (``MODELFLEET_*`` environment, ``$MODELFLEET_CONFIG`` or
            ``./config/settings.toml``).
        url: AMQP URL (overrides ``settings.amqp.url``).
        namespace: overrides ``settings.namespace``.
        timeout: default job deadline in seconds (overrides ``client.timeout_s``).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        url: str | None = None,
        namespace: str | None = None,
        timeout: float | None = None,
    ) -> None:
        # No settings: the same sources the commands read (environment, settings file).
        self.settings = settings if settings is not None else load_settings()
        self.url = url or self.settings.amqp.url
        self.names = Names(namespace or self.settings.namespace)
        self.timeout = timeout or self.settings.client.timeout_s
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._resuming: set[asyncio.Task[None]] = set()  # reply consumers being set up again
        # A job's cancel key is a keyed hash of a counter under this secret, its id the hash
        # of the key (modelfleet.cancel): unique, unforgeable, and no system call per job.
        self._secret = os.urandom(32)
        self._counter = itertools.count()
        self._pending: dict[str, _Job] = {}
        # Streams created and not iterated yet: only Client.cancel looks here.
        self._unstarted: weakref.WeakValueDictionary[str, _Job] = weakref.WeakValueDictionary()
        # Set while the channel is open with its reply consumer; publishes wait for it.
        self._ready = asyncio.Event()
        # The aiormq channel the reply consumer is on: jobs are published on it alone, since
        # direct reply-to answers come back on the channel that published the job.
        self._armed: aiormq.abc.AbstractChannel | None = None
        # Counts closes of the channel: a job confirmed in an earlier epoch lost its reply path.
        self._epoch = 0
        self._armed_epoch = -1  # the epoch _armed was armed in
        self._arming = asyncio.Lock()
        self._closing = False
        self._canceller: CancelPublisher | None = None
        self._watchdog: asyncio.Task[None] | None = None
        # Is a controller there to answer unroutable jobs? (modelfleet.presence)
        self._looks: QueueLooks | None = None
        self._warned_no_controller_at = -_WATCHDOG_LOG_EVERY_S
        self._stranding = asyncio.Lock()
        self._presence: asyncio.Task[None] | None = None
        self.controllers = ControllerWatch(
            remember_s=max(2 * self.settings.heartbeat.timeout_s, CONTROLLER_GRACE_S)
        )

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        if self._connection is not None:
            return
        self._closing = False
        self._connection = await connect(self.settings.amqp, role="client", url=self.url)
        try:
            topology = Topology(self.names, self.settings.routing, self.settings.heartbeat)
            await self._declare(topology)
            # publisher_confirms: a confirmed job is in its queue (or answered NO_WORKER). The
            # robust channel holds no topology of ours: its reopen after a channel error (the
            # jobs exchange deleted, say) can then never fail on a declaration.
            channel = await self._connection.channel(publisher_confirms=True)
            assert isinstance(channel, aio_pika.RobustChannel)
            self._channel = channel
            channel.close_callbacks.add(self._on_channel_closed)
            # The robust channel reopens by itself after a channel error, and after a
            # reconnection (then reconnect_callbacks fire too): either re-arms, once.
            channel.reopen_callbacks.add(self._on_reopened)
            self._connection.reconnect_callbacks.add(self._on_reopened)
            await self._arm()
            self._canceller = await CancelPublisher.open(self._connection, topology)
            if self.settings.client.fail_fast_without_controller:
                # Opened now, with a first look: no channel is opened later, per job or not.
                self._looks = QueueLooks(self._connection)
                first = await self._looks.consumers(self.names.unroutable)
                if first != QueueLooks.UNKNOWN:
                    self.controllers.saw(first, time.monotonic())
                self._presence = asyncio.create_task(
                    self._presence_loop(self._looks), name="modelfleet-client-presence"
                )
        except Exception:
            await self.close()
            raise

    async def _declare(self, topology: Topology) -> None:
        """Declare the jobs exchange (or, for a user who may not, check that it exists) on a
        plain channel that is closed after."""
        assert self._connection is not None
        plain = aio_pika.Channel(self._connection, publisher_confirms=False)
        await plain.initialize()
        try:
            await declare_where_allowed(
                self._connection, plain, topology.declare_jobs, required=[self.names.jobs]
            )
        finally:
            if not plain.is_closed:
                with contextlib.suppress(Exception):
                    await plain.close()

    async def close(self) -> None:
        self._closing = True
        # Wake publishes waiting for the channel (they see _closing and fail at once), and
        # answer jobs waiting for a reply: nothing can reach them any more.
        self._ready.set()
        canceller, self._canceller = self._canceller, None
        for job in list(self._pending.values()):
            job.replies.put_nowait(_CLOSED)
            if canceller is not None and job.published and not job.answered:
                # Nobody can read its answer now: cancel it on the workers (its own finish()
                # comes after the canceller is gone).
                canceller.send(job.job_id, job.deadline_epoch(), key=job.key)
        if canceller is not None:
            await canceller.aclose()  # the last cancels go out first
        presence, self._presence = self._presence, None
        if presence is not None:
            presence.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await presence
        looks, self._looks = self._looks, None
        if looks is not None:
            await looks.aclose()
        for task in [*self._resuming, self._watchdog]:
            if task is not None:
                task.cancel()
        self._watchdog = None
        connection, self._connection = self._connection, None
        self._channel = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
        self._ready.clear()

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet answered."""
        return len(self._pending)

    @property
    def ready(self) -> bool:
        """The channel is open with its reply consumer: a job is published at once."""
        return self._ready.is_set() and not self._closing

    async def _arm(self) -> None:
        """Consume direct reply-to on the channel's current aiormq channel, then let publishes
        through (once per aiormq channel, however many callbacks ask).

        Straight on aiormq's channel: aio-pika would wrap every reply in an IncomingMessage
        (aiormq 7.2 still runs each delivery in a task of its own), a tenth of the client's CPU
        per job (bench/README.md)."""
        async with self._arming:
            if self._channel is None or self._closing:
                return
            underlay = await self._channel.get_underlay_channel()
            if underlay is not self._armed:
                old = self._armed
                if old is not None and closing(old) and self._epoch == self._armed_epoch:
                    # Replaced before its close callback ran: what was sent on it is lost.
                    self._channel_lost("the channel was replaced")
                await underlay.basic_consume(DIRECT_REPLY_TO, self._on_reply, no_ack=True)
                if closing(underlay):
                    return  # closed while we armed it: the next reopen (or the watchdog) re-arms
                # The epoch now, not before the await: the old channel's close callback may
                # have run meanwhile (a new epoch), and this channel belongs to the new one.
                self._armed, self._armed_epoch = underlay, self._epoch
            elif closing(underlay):
                return
            if self._epoch == self._armed_epoch and not self._closing:
                self._ready.set()

    def _on_reopened(self, *_: object) -> None:
        if self._closing:
            return
        task = asyncio.create_task(self._rearm(), name="modelfleet-client-rearm")
        self._resuming.add(task)
        task.add_done_callback(self._resuming.discard)

    async def _rearm(self) -> None:
        while not self._closing and self._channel is not None:
            try:
                await self._arm()
                return
            except Exception as exc:
                if self._channel.is_closed:
                    # Closed again: its next reopen (or the reconnection) re-arms.
                    log.info("could not consume replies on the reopened channel (%s)", exc)
                    return
                log.warning("could not consume replies (%s); trying again", exc)
                await asyncio.sleep(_REARM_PAUSE_S)

    def _on_channel_closed(self, _sender: object, reason: object = None) -> None:
        """The channel closed (a channel error, connection lost, broker restart): answers to
        the jobs it published can no longer reach us, so fail those now instead of at their
        deadline. Jobs it had not confirmed are published again once it is back."""
        armed = self._armed
        if armed is not None and not armed.is_closed:
            return  # the close of a channel that was replaced already (and accounted for)
        self._channel_lost(
            (str(reason) or type(reason).__name__) if reason is not None else "closed"
        )

    def _channel_lost(self, cause: str) -> None:
        # Publishing before the reply consumer is restored would make the broker close the
        # channel again (PRECONDITION_FAILED: fast reply consumer does not exist).
        self._ready.clear()
        self._watch()
        dead = self._epoch
        self._epoch += 1
        if not self._pending:
            return
        for job in list(self._pending.values()):
            if job.sent_epoch == dead:
                job.replies.put_nowait(_Lost(cause, dead))

    def _watch(self) -> None:
        """Start the watchdog (one task at most; nothing per job)."""
        if self._closing or (self._watchdog is not None and not self._watchdog.done()):
            return
        self._watchdog = asyncio.get_running_loop().create_task(
            self._watch_channel(), name="modelfleet-client-watchdog"
        )

    async def _watch_channel(self) -> None:
        """While the client is not ready: if the connection is up and the channel still closed
        well after aio-pika should have reopened it (its failed reopen is only logged, and a
        channel closed while it was being restored is not reopened at all), reopen it here and
        re-arm; if that keeps failing, say so loudly (rate-limited). Ends once ready."""
        grace = self.settings.amqp.reconnect_interval_s + _WATCHDOG_GRACE_S
        failures = 0
        logged = -_WATCHDOG_LOG_EVERY_S
        while True:
            await asyncio.sleep(grace)
            connection, channel = self._connection, self._channel
            if self._closing or self._ready.is_set() or connection is None or channel is None:
                return
            if connection.is_closed or not connection.connected.is_set():
                continue  # reconnecting: the reconnection re-arms
            try:
                if channel.is_closed:
                    log.warning(
                        "the client's channel is still closed %.1fs after it was lost, with the "
                        "connection up: reopening it",
                        grace,
                    )
                    await channel.reopen()  # its reopen callbacks re-arm too; _arm runs once
                await self._arm()
                if self._ready.is_set():
                    return
            except Exception as exc:
                failures += 1
                now = time.monotonic()
                if now - logged >= _WATCHDOG_LOG_EVERY_S:
                    logged = now
                    log.error(
                        "the client cannot reopen its channel (%d attempt(s), last: %s); jobs "
                        "fail with CONNECTION_LOST until it can",
                        failures,
                        str(exc) or type(exc).__name__,
                    )

    async def _on_reply(self, message: aiormq.abc.DeliveredMessage) -> None:
        correlation_id = message.header.properties.correlation_id
        job = self._pending.get(correlation_id or "")
        if job is None:
            return  # a late answer to a job whose producer already gave up
        try:
            reply = parse_reply(message.body)
        except ValidationError as exc:
            log.warning("dropping malformed reply for job %s: %s", correlation_id, exc)
            return
        job.replies.put_nowait(reply)

    def _encode(self, model: str, payload: Any, deadline: float, stream: bool) -> bytes:
        try:
            check_model_name(model)
        except ValueError as exc:
            raise InvalidModelError(str(exc), model=str(model)[:100], job_id="-") from None
        try:
            body = JobRequest(
                model=model,
                payload=payload,
                deadline=deadline,
                stream=stream,
                sent_at=time.time(),
            )
            data = body.model_dump_json().encode()
        except (ValidationError, ValueError, TypeError) as exc:
            raise InvalidJobError(
                f"payload is not JSON-serialisable: {exc}", model=model, job_id="-"
            ) from None
        limit = self.settings.worker.max_payload_bytes
        if len(data) > limit:
            raise InvalidJobError(
                f"job body is {len(data)} bytes, above worker.max_payload_bytes ({limit})",
                model=model,
                job_id="-",
            )
        return data

    async def _publish(self, job: _Job) -> None:
        """Publish ``job``, again after each reconnection, until the broker confirms it; the
        caller bounds this in time (:meth:`_unsent` names the error when time runs out)."""
        if self._closing:
            raise _closed_error()
        if self._channel is None:
            raise BrokerError("client is not connected: use 'async with Client(...)'")
        unanswerable = await self._unanswerable(job.model)
        if unanswerable is not None:
            raise NoWorkerError(unanswerable, model=job.model, job_id=job.job_id)
        looks = self._looks
        if looks is None or self.controllers.absent_since is None:
            await self._send(job)
            return
        # No controller now: did the job go to {ns}.unroutable, where only a controller answers?
        # One publish at a time, so that the queue's count says whose job it was.
        async with self._stranding:
            before = await looks.messages(self.names.unroutable, fresh=True)
            await self._send(job)
            after = await looks.messages(self.names.unroutable, fresh=True)
        if before == QueueLooks.UNKNOWN or after <= before:
            return
        job.stranded = True
        if self.controllers.gone(time.monotonic()):
            raise NoWorkerError(
                stranded_text(self.names, job.model), model=job.model, job_id=job.job_id
            )
        # A controller seen lately may come back and answer it; if none does within
        # ControllerWatch.remember_s, the presence loop fails it.

    async def _send(self, job: _Job) -> None:
        """Publish ``job`` until the broker confirms it (the loop of :meth:`_publish`)."""
        now = time.time()
        remaining = max(job.deadline - time.monotonic(), 0.001)
        properties = job_properties(
            job.job_id,
            reply_to=DIRECT_REPLY_TO,
            # The job's deadline is its time-to-live: nobody runs a job its producer gave up on.
            ttl_s=remaining,
            # Integer epoch milliseconds: an AMQP table carries a Python float as a 32-bit
            # float, which rounds today's epoch seconds to a multiple of 128.
            headers={DEADLINE_HEADER: round((now + remaining) * 1000)},
            now=now,
        )
        while True:
            await self._ready.wait()
            if self._closing:
                raise _closed_error()
            epoch, underlay = self._epoch, self._armed
            try:
                # The jobs exchange has an alternate exchange: an unroutable job is caught there
                # and answered with NO_WORKER, so `mandatory` is not needed.
                assert underlay is not None
                await publish_on(
                    underlay, job.body, properties, exchange=self.names.jobs, routing_key=job.model
                )
            except aio_pika.exceptions.DeliveryError as exc:
                # A nack: the model's queue is full (x-overflow=reject-publish).
                raise OverloadedError(
                    "the model's queue is full; retry later or add workers",
                    model=job.model,
                    job_id=job.job_id,
                ) from exc
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                if not self._names_jobs(exc):
                    # Another publish on this channel closed it: ours may go again.
                    self._retry_later(job, underlay, exc)
                    await asyncio.sleep(_REPUBLISH_PAUSE_S)
                    continue
                # Waiting would not help: nobody can run the job until a controller (or an
                # operator) declares the exchange again, and NO_WORKER is what a caller already
                # handles for "nothing can take this model now". An earlier attempt of this
                # publish may have been queued before the exchange went: finish() cancels it.
                raise NoWorkerError(
                    f"exchange {self.names.jobs!r} does not exist (deleted, or no controller has "
                    f"declared namespace {self.names.ns!r}); the job may not have been queued "
                    "and was cancelled",
                    model=job.model,
                    job_id=job.job_id,
                ) from None
            except aiormq.exceptions.ChannelAccessRefused as exc:
                if not self._names_jobs(exc):
                    self._retry_later(job, underlay, exc)
                    await asyncio.sleep(_REPUBLISH_PAUSE_S)
                    continue
                # Final: a retry would be refused again, closing the channel (and failing the
                # other jobs on it) each time.
                raise BrokerError(
                    f"the broker refused job {job.job_id} for model {job.model!r}: this AMQP "
                    f"user may not publish to {self.names.jobs!r} ({exc}); grant it write "
                    "permission on the namespace (modelfleet permissions)"
                ) from None
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                if _MESSAGE_TOO_BIG in str(exc):
                    raise InvalidJobError(
                        f"the broker refused the job's body ({len(job.body)} bytes): {exc}",
                        model=job.model,
                        job_id=job.job_id,
                    ) from None
                # Published before the reply consumer was back on a reopened channel ("fast
                # reply consumer does not exist"), or another frame on this channel closed it:
                # publish again once it is back.
                self._retry_later(job, underlay, exc)
                await asyncio.sleep(_REPUBLISH_PAUSE_S)
                continue
            except (
                aio_pika.exceptions.AMQPError,
                aiormq.exceptions.AMQPError,
                # "channel closed" while the robust channel reopens (a RuntimeError)
                aiormq.exceptions.ChannelInvalidStateError,
                ConnectionError,
            ) as exc:
                # The channel is down (a channel error, broker restart, network cut): it comes
                # back by itself; publish again once it has, within the job's timeout. A
                # publish whose confirm was lost may run twice (at-least-once, same id).
                self._retry_later(job, underlay, exc)
                await asyncio.sleep(_REPUBLISH_PAUSE_S)
                continue
            job.sent = True
            job.sent_epoch = epoch
            if self._epoch != epoch:
                # Confirmed, but the channel closed before we got here (the close callback did
                # not see this job as sent): its answer cannot reach us.
                job.replies.put_nowait(_Lost("the channel closed", epoch))
            return

    async def _unanswerable(self, model: str) -> str | None:
        """Why nothing in the namespace can answer a job for ``model`` now (no controller,
        none for a while, and no worker on the model's queue); None when something may.
        Looks reused for a second decide only that all is well: a job is failed only on
        looks taken now (a controller that just started is not missed)."""
        looks = self._looks
        if looks is None:
            return None
        for fresh in (False, True):
            controllers = await looks.consumers(self.names.unroutable, fresh=fresh)
            if controllers == QueueLooks.UNKNOWN:
                return None
            now = time.monotonic()
            self.controllers.saw(controllers, now)
            if not self.controllers.gone(now):
                return None
            workers = await looks.consumers(self.names.model_queue(model), fresh=fresh)
            if workers == QueueLooks.UNKNOWN:
                return None
            if workers:
                if now - self._warned_no_controller_at > _WATCHDOG_LOG_EVERY_S:
                    self._warned_no_controller_at = now
                    log.warning(
                        "no controller serves namespace %r (nothing consumes %r): jobs are sent "
                        "one at a time, and one that no bound queue takes fails with NO_WORKER",
                        self.names.ns,
                        self.names.unroutable,
                    )
                return None
        return no_controller_text(self.names, model, unroutable_exists=controllers is not None)

    async def _presence_loop(self, looks: QueueLooks) -> None:
        """Look for a controller once a second, so that its absence is known from when it
        began; fail the stranded jobs (modelfleet.presence) once it is gone for good."""
        while not self._closing:
            await asyncio.sleep(LOOK_MAX_AGE_S)
            controllers = await looks.consumers(self.names.unroutable, fresh=True)
            if controllers == QueueLooks.UNKNOWN:
                continue
            now = time.monotonic()
            self.controllers.saw(controllers, now)
            stranded = [job for job in self._pending.values() if job.stranded]
            if not stranded:
                continue
            if controllers:
                for job in stranded:
                    job.stranded = False  # a controller answers what waits in the queue
            elif self.controllers.gone(now):
                for job in stranded:
                    job.stranded = False
                    job.replies.put_nowait(
                        ErrorReply.build(
                            ErrorCode.NO_WORKER,
                            stranded_text(self.names, job.model),
                            model=job.model,
                            job_id=job.job_id,
                        )
                    )
                    self._abandoned(job)  # it waits in {ns}.unroutable: cancel it there too

    def no_controller_note(self) -> str:
        """A clause for a timeout's message when no controller was seen lately (else "")."""
        if self.controllers.absent_since is None:
            return ""
        return (
            f"; no controller was consuming {self.names.unroutable!r}, so a job for a model "
            f"no controller has bound waited for one (is namespace {self.names.ns!r} right?)"
        )

    def _names_jobs(self, exc: BaseException) -> bool:
        """Is this channel error about our jobs exchange (so caused by publishing a job)?"""
        return f"'{self.names.jobs}'" in str(exc)

    def _retry_later(
        self, job: _Job, underlay: aiormq.abc.AbstractChannel | None, exc: BaseException
    ) -> None:
        job.last_error = exc
        if underlay is not None and underlay is self._armed and closing(underlay):
            # The armed channel is closing (its close callback may be a few loop turns away):
            # hold every publish until it is re-armed, rather than let them reach a channel
            # the broker closed (which would close the connection).
            self._ready.clear()
            self._watch()

    def _unsent(self, job: _Job) -> JobError:
        """The error for a job whose time ran out before the broker confirmed it."""
        if job.last_error is not None or not self._ready.is_set():
            cause = job.last_error or "reconnecting"
            return ConnectionLostError(
                f"RabbitMQ stayed unreachable for the job's whole {job.timeout:g}s "
                f"({cause}); the job was not sent",
                model=job.model,
                job_id=job.job_id,
            )
        return JobTimeoutError(
            f"the broker did not accept the job within {job.timeout:g}s (is RabbitMQ reachable?)",
            model=job.model,
            job_id=job.job_id,
        )

    def _start(self, model: str, payload: Any, timeout: float | None, stream: bool) -> _Job:
        timeout = self.timeout if timeout is None else timeout
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        key = cancel_key(self._secret, next(self._counter))
        deadline = time.monotonic() + timeout
        body = self._encode(model, payload, time.time() + timeout, stream)
        return _Job(self, model, job_id_for(key), key, body, timeout, deadline)

    async def submit(
        self,
        model: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        on_job_id: Callable[[str], None] | None = None,
    ) -> Any:
        """Run a job and return its result.

        ``on_job_id`` is called with the job's id before it is sent (for logs, or to
        :meth:`cancel` it from elsewhere).

        Raises :class:`NoWorkerError` (no live worker, at once), :class:`JobTimeoutError`,
        :class:`WorkerError`, :class:`OverloadedError`, :class:`InvalidJobError` or
        :class:`InvalidModelError` — each with ``.code``, ``.model`` and ``.job_id``; and
        :class:`~modelfleet.errors.BrokerError` (not a job error) when the broker refuses the
        publish itself (this user may not publish jobs) or the client is closed.
        """
        job = self._start(model, payload, timeout, stream=False)
        if on_job_id is not None:
            on_job_id(job.job_id)
        try:
            return await job.result()
        finally:
            job.finish()

    def stream(self, model: str, payload: Any = None, *, timeout: float | None = None) -> JobStream:
        """Run a streaming job: ``async for chunk in client.stream(...)``; the final result is
        ``stream.result`` after the loop. Use as ``async with`` to release it early. The job
        is sent when the iteration starts (a stream never iterated costs nothing).

        Raises what :meth:`submit` does, and :class:`StreamRestartedError` when the job
        restarted on another worker after chunks had reached the caller."""
        job = self._start(model, payload, timeout, stream=True)
        self._unstarted[job.job_id] = job
        return JobStream(job)

    async def cancel(self, job_id: str) -> None:
        """Cancel a job of this client: a worker that has not started it skips it, one running
        it stops its handler (coroutine and async-generator handlers; a thread runs to its
        end). Whoever awaits the job here gets :class:`~modelfleet.errors.JobCancelledError`.
        Best effort: a job that already finished is not affected, nor is another producer's
        (workers want the job's key, which only its producer can make), nor one this client no
        longer waits for (its key is gone with it)."""
        job = self._pending.get(job_id) or self._unstarted.pop(job_id, None)
        if job is None:
            return
        job.replies.put_nowait(
            ErrorReply.build(
                ErrorCode.CANCELLED, "cancelled by the producer", model="", job_id=job_id
            )
        )
        if self._canceller is not None:
            await self._canceller.publish(job_id, job.deadline_epoch(), key=job.key)

    def _abandoned(self, job: _Job) -> None:
        """``job`` was published and left before its answer: cancel it on the workers."""
        if self._canceller is not None:
            self._canceller.send(job.job_id, job.deadline_epoch(), key=job.key)


class _Job:
    """One submitted job's bookkeeping (internal)."""

    def __init__(
        self,
        client: Client,
        model: str,
        job_id: str,
        key: str,
        body: bytes,
        timeout: float,
        deadline: float,
    ) -> None:
        self.client = client
        self.model = model
        self.job_id = job_id
        self.key = key  # cancels it (modelfleet.cancel): job_id is its hash
        self.body = body
        self.timeout = timeout
        self.deadline = deadline
        self.replies: asyncio.Queue[_Reply | _Lost | _Closed] = asyncio.Queue()
        self.published = False  # (maybe) sent: a publish may be cancelled after the broker took it
        self.sent = False  # the broker confirmed the publish
        self.sent_epoch = -1  # the client's channel epoch of that confirm
        self.last_error: BaseException | None = None  # why the last publish attempt failed
        self.answered = False  # a final answer (result or error) came
        # Sent while no controller was there, into {ns}.unroutable (modelfleet.presence): it
        # fails with NO_WORKER if no controller comes back within the grace.
        self.stranded = False

    def _remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0)

    def deadline_epoch(self) -> float:
        return time.time() + self._remaining()

    def _no_answer(self) -> JobTimeoutError:
        return JobTimeoutError(
            f"no answer within {self.timeout:g}s (workers busy, hung or gone)"
            + self.client.no_controller_note(),
            model=self.model,
            job_id=self.job_id,
        )

    def _register(self) -> None:
        # Only now: a job in _pending is one whose answer we wait for (see Client.pending).
        self.published = True
        self.client._pending[self.job_id] = self

    async def result(self) -> Any:
        """Publish, then wait for the result: one timer for both (submit's hot path)."""
        self._register()
        try:
            async with asyncio.timeout(self._remaining()):
                await self.client._publish(self)
                while True:
                    reply = self._take(await self.replies.get())
                    if isinstance(reply, ResultReply):
                        return reply.result
        except TimeoutError:
            raise (self._no_answer() if self.sent else self.client._unsent(self)) from None

    async def publish(self) -> None:
        self._register()
        try:
            async with asyncio.timeout(self._remaining()):
                await self.client._publish(self)
        except TimeoutError:
            raise self.client._unsent(self) from None

    async def next_reply(self) -> ResultReply | ChunkReply:
        try:
            async with asyncio.timeout(self._remaining()):
                while True:
                    reply = self._take(await self.replies.get())
                    if reply is not None:
                        return reply
        except TimeoutError:
            raise self._no_answer() from None

    def _take(self, reply: _Reply | _Lost | _Closed) -> ResultReply | ChunkReply | None:
        """Note a reply; an error reply raises its error; None: nothing to take."""
        if isinstance(reply, _Closed):
            raise _closed_error()
        if isinstance(reply, _Lost):
            if reply.epoch != self.sent_epoch or not self.replies.empty():
                # Stale (the job went out again on a newer channel) or overtaken by answers
                # that were already on their way: those win.
                return None
            # Not `answered`: finish() then cancels it on the workers, since nobody can read
            # its answer (the connection is often still up after a channel error).
            raise ConnectionLostError(
                f"the channel to RabbitMQ closed before the answer came ({reply.cause}); the "
                "job was cancelled: a worker skips it if it had not started, but it may have "
                "run: retry it if it is idempotent",
                model=self.model,
                job_id=self.job_id,
            )
        if isinstance(reply, ErrorReply):
            self.answered = True
            raise error_for_code(reply.code, reply.message, model=self.model, job_id=self.job_id)
        if isinstance(reply, ResultReply):
            self.answered = True
        return reply

    def finish(self) -> None:
        if self.client._pending.pop(self.job_id, None) is None:
            return  # finished already, or never published
        if self.published and not self.answered:
            self.client._abandoned(self)


class JobStream:
    """Async iterator over a streamed job's chunks; ``result`` holds the final value after.

    The chunks and the result come from one attempt of the job: a job redelivered after its
    worker died starts again (a new ``attempt_id``), and once chunks of the first attempt
    reached the caller the stream ends with :class:`StreamRestartedError` (the new attempt is
    cancelled) rather than splice two texts. Before any chunk, the new attempt is followed."""

    def __init__(self, job: _Job) -> None:
        self._job = job
        self._published = False
        self._next_seq = 0
        self._attempt = ""  # the attempt whose chunks we follow ("" = not known yet)
        self._yielded = 0
        self.done = False
        self.result: Any = None

    @property
    def job_id(self) -> str:
        return self._job.job_id

    @property
    def model(self) -> str:
        return self._job.model

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._chunks()

    async def __aenter__(self) -> JobStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._job.finish()

    def _same_attempt(self, attempt_id: str) -> bool:
        """Follow the attempt that produced the chunks so far; False: drop this reply."""
        if not attempt_id or attempt_id == self._attempt:
            return True  # "": a worker from before attempt ids; seq alone then
        if self._attempt and self._yielded:
            raise StreamRestartedError(
                f"the job restarted on another worker after {self._yielded} chunk(s) of its "
                "first attempt had been received (its worker died or lost its connection); "
                "the attempts are not spliced: retry the job for a whole answer",
                model=self._job.model,
                job_id=self._job.job_id,
            )
        # The first attempt heard of, or a new one before any chunk reached the caller: an
        # attempt is never resumed once left (its worker died), so none is remembered.
        self._attempt = attempt_id
        self._next_seq = 0
        return True

    async def _chunks(self) -> AsyncIterator[Any]:
        try:
            if not self._published:
                self._published = True
                self._job.client._unstarted.pop(self._job.job_id, None)
                if self._job.replies.empty():  # else cancelled before it was sent: not sent
                    await self._job.publish()
            while not self.done:
                reply = await self._job.next_reply()
                if not self._same_attempt(reply.attempt_id):
                    continue
                if isinstance(reply, ResultReply):
                    self.result = reply.result
                    self.done = True
                    return
                # Without attempt ids, a redelivered job restarts at seq 0: skip what we have.
                if reply.seq < self._next_seq:
                    continue
                self._next_seq = reply.seq + 1
                self._yielded += 1
                yield reply.data
        finally:
            # Also after StreamRestartedError: the job is not answered, so its new attempt is
            # cancelled on the workers.
            self._job.finish()

    async def aclose(self) -> None:
        """Leave the stream now; a job not finished yet is cancelled on its worker."""
        self._job.finish()

    async def collect(self) -> list[Any]:
        """All chunks, in order (the final result is then in ``result``)."""
        return [chunk async for chunk in self]


def error_json(exc: JobError) -> str:
    """The one-line JSON the CLI prints for a failed job."""
    return json.dumps(exc.to_dict())
