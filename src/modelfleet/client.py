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
handler stopped if running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractRobustConnection,
)
from pydantic import ValidationError

from modelfleet.cancel import CancelPublisher
from modelfleet.config import Settings
from modelfleet.connections import connect
from modelfleet.errors import (
    BrokerError,
    ConnectionLostError,
    ErrorCode,
    InvalidJobError,
    InvalidModelError,
    JobError,
    JobTimeoutError,
    OverloadedError,
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
from modelfleet.publishing import job_properties, publish
from modelfleet.security import declare_where_allowed
from modelfleet.topology import DEADLINE_HEADER, Names, Topology

__all__ = ["Client", "JobStream"]

log = logging.getLogger(__name__)

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
# Pause between publish attempts while the connection is down (the robust connection retries
# every amqp.reconnect_interval_s; this only decides how soon after it we notice).
_REPUBLISH_PAUSE_S = 0.1

_Reply = ResultReply | ChunkReply | ErrorReply


class Client:
    """Submits jobs to a modelfleet namespace.

    Keywords:
        settings: ``amqp.*``, ``namespace``, ``client.timeout_s``, ``worker.max_payload_bytes``.
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
        self.settings = settings or Settings()
        self.url = url or self.settings.amqp.url
        self.names = Names(namespace or self.settings.namespace)
        self.timeout = timeout or self.settings.client.timeout_s
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._jobs: AbstractExchange | None = None
        self._resuming: set[asyncio.Task[None]] = set()  # reply consumers being set up again
        # Job ids: 128 random bits from a generator seeded by the OS, without a system call per
        # job (uuid4 and secrets make one). Ids only need to be unique, not secret.
        self._ids = random.Random(os.urandom(32))
        self._pending: dict[str, asyncio.Queue[_Reply]] = {}
        # Set while the connection (with its reply consumer) is up; publishes wait for it.
        self._ready = asyncio.Event()
        self._canceller: CancelPublisher | None = None

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
        self._connection = await connect(self.settings.amqp, role="client", url=self.url)
        try:
            self._channel = await self._connection.channel(publisher_confirms=True)
            topology = Topology(self.names, self.settings.routing, self.settings.heartbeat)
            # A least-privilege producer may not declare: it then only looks the exchange up.
            self._jobs = await declare_where_allowed(
                self._connection, self._channel, topology.declare_jobs, required=[self.names.jobs]
            ) or await self._channel.get_exchange(self.names.jobs)
            await self._consume_replies()
            self._canceller = await CancelPublisher.open(self._connection, topology)
            self._channel.close_callbacks.add(self._on_channel_closed)
            self._connection.reconnect_callbacks.add(self._on_reconnected)
            self._ready.set()
        except Exception:
            await self.close()
            raise

    async def close(self) -> None:
        canceller, self._canceller = self._canceller, None
        if canceller is not None:
            await canceller.aclose()  # the last cancels go out first
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet answered."""
        return len(self._pending)

    async def _consume_replies(self) -> None:
        """Direct reply-to: consume the pseudo-queue (no-ack) on the channel we publish from.

        Straight on aiormq's channel: aio-pika would wrap every reply in an IncomingMessage and
        a task of its own, a tenth of the client's CPU per job (bench/README.md). The consumer
        is set up again after each reconnection (:meth:`_on_reconnected`)."""
        assert self._channel is not None
        underlay = await self._channel.get_underlay_channel()
        await underlay.basic_consume(DIRECT_REPLY_TO, self._on_reply, no_ack=True)

    def _on_reconnected(self, *_: object) -> None:
        # Called once every channel has been restored: consume the replies again, then let
        # publishes through.
        task = asyncio.create_task(self._resume(), name="modelfleet-client-resume")
        self._resuming.add(task)
        task.add_done_callback(self._resuming.discard)

    async def _resume(self) -> None:
        try:
            await self._consume_replies()
        except Exception as exc:
            # The connection dropped again: the next reconnection tries again.
            log.info("could not consume replies after a reconnection (%s)", exc)
            return
        self._ready.set()

    def _on_channel_closed(self, _sender: object, reason: object = None) -> None:
        """The reply channel died (connection lost, broker restart): answers to the jobs still
        pending can no longer reach us, so fail them now instead of at their deadline."""
        # Publishing before the robust connection has restored the reply consumer would make
        # the broker close the channel again (PRECONDITION_FAILED: fast reply consumer does
        # not exist) and abort the restore; publishes wait for the reconnection instead.
        self._ready.clear()
        if not self._pending:
            return
        cause = str(reason) or type(reason).__name__ if reason is not None else "closed"
        for job_id, waiter in list(self._pending.items()):
            waiter.put_nowait(
                ErrorReply.build(
                    ErrorCode.CONNECTION_LOST,
                    f"the connection to RabbitMQ dropped before the answer came ({cause}); "
                    "the job may still run: retry it if it is idempotent",
                    model="",
                    job_id=job_id,
                )
            )

    async def _on_reply(self, message: aiormq.abc.DeliveredMessage) -> None:
        correlation_id = message.header.properties.correlation_id
        waiter = self._pending.get(correlation_id or "")
        if waiter is None:
            return  # a late answer to a job whose producer already gave up
        try:
            reply = parse_reply(message.body)
        except ValidationError as exc:
            log.warning("dropping malformed reply for job %s: %s", correlation_id, exc)
            return
        waiter.put_nowait(reply)

    def _encode(self, model: str, payload: Any, deadline: float, stream: bool) -> bytes:
        try:
            check_model_name(model)
        except ValueError as exc:
            raise InvalidModelError(str(exc), model=str(model)[:100], job_id="-") from None
        try:
            body = JobRequest(
                model=model, payload=payload, deadline=deadline, stream=stream, sent_at=time.time()
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
        if self._jobs is None:
            raise BrokerError("client is not connected: use 'async with Client(...)'")
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
            try:
                # The jobs exchange has an alternate exchange: an unroutable job is caught there
                # and answered with NO_WORKER, so `mandatory` is not needed.
                assert self._channel is not None
                await publish(
                    self._channel,
                    job.body,
                    properties,
                    exchange=self.names.jobs,
                    routing_key=job.model,
                )
                job.sent = True
                return
            except aio_pika.exceptions.DeliveryError as exc:
                # A nack: the model's queue is full (x-overflow=reject-publish).
                raise OverloadedError(
                    "the model's queue is full; retry later or add workers",
                    model=job.model,
                    job_id=job.job_id,
                ) from exc
            except (
                aio_pika.exceptions.AMQPError,
                aiormq.exceptions.AMQPError,
                # "channel closed" while the robust channel reopens (a RuntimeError)
                aiormq.exceptions.ChannelInvalidStateError,
                ConnectionError,
            ) as exc:
                # The channel is down (broker restart, network cut): the robust connection is
                # coming back; publish again once it has, within the job's timeout. A publish
                # whose confirm was lost may run twice (at-least-once, same id).
                job.last_error = exc
                await asyncio.sleep(_REPUBLISH_PAUSE_S)

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
        job_id = f"{self._ids.getrandbits(128):032x}"
        deadline = time.monotonic() + timeout
        body = self._encode(model, payload, time.time() + timeout, stream)
        queue: asyncio.Queue[_Reply] = asyncio.Queue()
        self._pending[job_id] = queue
        return _Job(self, model, job_id, body, timeout, deadline, queue)

    async def submit(self, model: str, payload: Any = None, *, timeout: float | None = None) -> Any:
        """Run a job and return its result.

        Raises :class:`NoWorkerError` (no live worker, at once), :class:`JobTimeoutError`,
        :class:`WorkerError`, :class:`OverloadedError`, :class:`InvalidJobError` or
        :class:`InvalidModelError` — each with ``.code``, ``.model`` and ``.job_id``.
        """
        job = self._start(model, payload, timeout, stream=False)
        try:
            return await job.result()
        finally:
            job.finish()

    def stream(self, model: str, payload: Any = None, *, timeout: float | None = None) -> JobStream:
        """Run a streaming job: ``async for chunk in client.stream(...)``; the final result is
        ``stream.result`` after the loop. Use as ``async with`` to release it early."""
        return JobStream(self._start(model, payload, timeout, stream=True))

    async def cancel(self, job_id: str) -> None:
        """Cancel a job: a worker that has not started it skips it, one running it stops its
        handler (coroutine and async-generator handlers; a thread runs to its end). Whoever
        awaits the job here gets :class:`~modelfleet.errors.JobCancelledError`. Best effort: a
        job that already finished is not affected."""
        waiter = self._pending.get(job_id)
        if waiter is not None:
            waiter.put_nowait(
                ErrorReply.build(
                    ErrorCode.CANCELLED, "cancelled by the producer", model="", job_id=job_id
                )
            )
        if self._canceller is not None:
            await self._canceller.publish(job_id)

    def _abandoned(self, job: _Job) -> None:
        """``job`` was published and left before its answer: cancel it on the workers."""
        if self._canceller is not None:
            remaining = job.deadline - time.monotonic()
            self._canceller.send(job.job_id, time.time() + max(remaining, 0.0))


class _Job:
    """One submitted job's bookkeeping (internal)."""

    def __init__(
        self,
        client: Client,
        model: str,
        job_id: str,
        body: bytes,
        timeout: float,
        deadline: float,
        replies: asyncio.Queue[_Reply],
    ) -> None:
        self.client = client
        self.model = model
        self.job_id = job_id
        self.body = body
        self.timeout = timeout
        self.deadline = deadline
        self.replies = replies
        self.published = False  # (maybe) sent: a publish may be cancelled after the broker took it
        self.sent = False  # the broker confirmed the publish
        self.last_error: BaseException | None = None  # why the last publish attempt failed
        self.answered = False  # a final answer (result or error) came

    def _remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0)

    def _no_answer(self) -> JobTimeoutError:
        return JobTimeoutError(
            f"no answer within {self.timeout:g}s (workers busy, hung or gone)",
            model=self.model,
            job_id=self.job_id,
        )

    async def result(self) -> Any:
        """Publish, then wait for the result: one timer for both (submit's hot path)."""
        self.published = True
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
        self.published = True
        try:
            async with asyncio.timeout(self._remaining()):
                await self.client._publish(self)
        except TimeoutError:
            raise self.client._unsent(self) from None

    async def next_reply(self) -> ResultReply | ChunkReply:
        try:
            async with asyncio.timeout(self._remaining()):
                reply = await self.replies.get()
        except TimeoutError:
            raise self._no_answer() from None
        return self._take(reply)

    def _take(self, reply: _Reply) -> ResultReply | ChunkReply:
        """Note a reply; an error reply raises its error."""
        if isinstance(reply, ErrorReply):
            self.answered = True
            raise error_for_code(reply.code, reply.message, model=self.model, job_id=self.job_id)
        if isinstance(reply, ResultReply):
            self.answered = True
        return reply

    def finish(self) -> None:
        if self.client._pending.pop(self.job_id, None) is None:
            return  # finished already
        if self.published and not self.answered:
            self.client._abandoned(self)


class JobStream:
    """Async iterator over a streamed job's chunks; ``result`` holds the final value after."""

    def __init__(self, job: _Job) -> None:
        self._job = job
        self._published = False
        self._next_seq = 0
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

    async def _chunks(self) -> AsyncIterator[Any]:
        try:
            if not self._published:
                self._published = True
                await self._job.publish()
            while not self.done:
                reply = await self._job.next_reply()
                if isinstance(reply, ResultReply):
                    self.result = reply.result
                    self.done = True
                    return
                # A job redelivered after its worker died restarts at seq 0: skip what we have.
                if reply.seq < self._next_seq:
                    continue
                self._next_seq = reply.seq + 1
                yield reply.data
        finally:
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
