"""Helpers for the in-process integration tests: taps on the real broker, raw publishing,
and a small fleet (controller + worker + client) to test against.

The taps talk to RabbitMQ directly (plain aio-pika, no modelfleet code in the way) so a test
sees what really travelled: the heartbeats on ``{ns}.heartbeats``, the copies in
``{ns}.errors``, the replies a raw producer gets on its direct reply-to.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

from modelfleet.client import Client
from modelfleet.config import Settings
from modelfleet.controller import Controller
from modelfleet.jobs import Job
from modelfleet.messages import ChunkReply, ErrorReply, Heartbeat, ResultReply, parse_reply
from modelfleet.topology import Topology
from modelfleet.worker import Handler, Worker
from tests.helpers import wait_for

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


@asynccontextmanager
async def broker(url: str) -> AsyncIterator[AbstractConnection]:
    """A plain (not robust) connection for the test's own look at the broker."""
    connection = await aio_pika.connect(url)
    try:
        yield connection
    finally:
        await connection.close()


async def queue_exists(connection: AbstractConnection, name: str) -> bool:
    """Passive declare on a throw-away channel (a miss closes the channel)."""
    channel = await connection.channel()
    try:
        await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    await channel.close()
    return True


async def ready_count(connection: AbstractConnection, name: str) -> int:
    """Messages ready in queue ``name`` (which must exist)."""
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await channel.close()


def metric(controller: Controller, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample of the controller's Prometheus registry (0 when absent)."""
    value = controller.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


async def wait_routable(controller: Controller, model: str, within: float = 5.0) -> None:
    await wait_for(
        lambda: controller.routing.routable(model), timeout=within, what=f"{model} routable"
    )


class ErrorQueue:
    """Reads ``{ns}.errors`` (no-ack gets) and keeps every copy it has seen."""

    def __init__(self, queue: AbstractQueue) -> None:
        self.queue = queue
        self.seen: list[AbstractIncomingMessage] = []

    @classmethod
    async def open(cls, connection: AbstractConnection, topology: Topology) -> ErrorQueue:
        channel = await connection.channel()
        # Idempotent, same arguments as every modelfleet process: creates it if nobody has yet.
        await topology.declare_dead(channel)
        return cls(await channel.declare_queue(topology.names.errors, passive=True))

    async def pull(self) -> list[AbstractIncomingMessage]:
        """Take everything there is now; returns all copies seen so far."""
        while True:
            message = await self.queue.get(no_ack=True, fail=False)
            if message is None:
                return self.seen
            self.seen.append(message)

    def of(self, job_id: str) -> list[AbstractIncomingMessage]:
        return [m for m in self.seen if m.message_id == job_id]

    async def wait_job(self, job_id: str, within: float = 5.0) -> AbstractIncomingMessage:
        async def arrived() -> bool:
            await self.pull()
            return bool(self.of(job_id))

        await wait_for(arrived, timeout=within, what=f"job {job_id} in the error queue")
        return self.of(job_id)[0]

    async def wait_count(
        self,
        count: int,
        where: Callable[[AbstractIncomingMessage], bool] = lambda _: True,
        within: float = 5.0,
    ) -> list[AbstractIncomingMessage]:
        async def enough() -> bool:
            await self.pull()
            return sum(1 for m in self.seen if where(m)) >= count

        await wait_for(enough, timeout=within, what=f"{count} copies in the error queue")
        return [m for m in self.seen if where(m)]


def header(message: AbstractIncomingMessage, name: str) -> Any:
    value = (message.headers or {}).get(name)
    return value.decode() if isinstance(value, bytes) else value


class HeartbeatTap:
    """A queue of the test's own on ``{ns}.heartbeats``: every heartbeat with its arrival time."""

    def __init__(self) -> None:
        self.beats: list[tuple[float, Heartbeat]] = []

    @classmethod
    async def open(cls, connection: AbstractConnection, topology: Topology) -> HeartbeatTap:
        tap = cls()
        channel = await connection.channel()
        exchange = await topology.declare_heartbeats(channel)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange)
        await queue.consume(tap._on_message, no_ack=True)
        return tap

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.beats.append((time.monotonic(), Heartbeat.model_validate_json(message.body)))

    def of(self, worker_id: str) -> list[Heartbeat]:
        return [hb for _, hb in self.beats if hb.worker_id == worker_id]

    def timed(self, worker_id: str) -> list[tuple[float, Heartbeat]]:
        return [(t, hb) for t, hb in self.beats if hb.worker_id == worker_id]


Reply = ResultReply | ChunkReply | ErrorReply


class RawProducer:
    """Publishes hand-made job messages to ``{ns}.jobs`` and collects their replies.

    It consumes the direct reply-to pseudo-queue on the channel it publishes from, exactly as a
    modelfleet Client does, but leaves the body and properties entirely to the test.
    """

    def __init__(self, channel: AbstractChannel, jobs: AbstractExchange) -> None:
        self.channel = channel
        self.jobs = jobs
        self.replies: dict[str, list[Reply]] = {}

    @classmethod
    async def open(cls, connection: AbstractConnection, topology: Topology) -> RawProducer:
        channel = await connection.channel(publisher_confirms=True)
        jobs = await topology.declare_jobs(channel)
        producer = cls(channel, jobs)
        reply_queue = await channel.declare_queue(DIRECT_REPLY_TO, passive=True)
        await reply_queue.consume(producer._on_reply, no_ack=True)
        return producer

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        self.replies.setdefault(message.correlation_id or "", []).append(parse_reply(message.body))

    async def publish(
        self,
        body: bytes,
        *,
        model: str,
        job_id: str | None = None,
        content_type: str | None = "application/json",
        **properties: Any,
    ) -> str:
        job_id = job_id or uuid.uuid4().hex
        message = aio_pika.Message(
            body,
            content_type=content_type,
            message_id=job_id,
            correlation_id=job_id,
            reply_to=DIRECT_REPLY_TO,
            **properties,
        )
        await self.jobs.publish(message, routing_key=model, mandatory=False)
        return job_id

    async def reply(self, job_id: str, within: float = 5.0) -> Reply:
        await wait_for(lambda: job_id in self.replies, timeout=within, what=f"reply to {job_id}")
        return self.replies[job_id][0]


class Fleet:
    """A controller, one worker and a client on one namespace, the model routable."""

    def __init__(self, controller: Controller, worker: Worker, client: Client) -> None:
        self.controller = controller
        self.worker = worker
        self.client = client


@asynccontextmanager
async def fleet(
    settings: Settings,
    handler: Handler,
    model: str,
    *,
    worker_id: str = "worker-1",
    concurrency: int | None = None,
) -> AsyncIterator[Fleet]:
    """Start controller, worker and client (stopped in reverse order on the way out)."""
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        worker = Worker(
            handler,
            [model],
            settings=settings,
            worker_id=worker_id,
            concurrency=concurrency,
            install_signal_handlers=False,
        )
        await stack.enter_async_context(worker)
        client = await stack.enter_async_context(Client(settings))
        await wait_routable(controller, model)
        yield Fleet(controller, worker, client)


class Holding:
    """A handler that holds each job until released; records who started, finished and was
    cancelled. Its result is the payload (``wrap``: ``{"done": payload}``)."""

    def __init__(self, *, wrap: bool = False) -> None:
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.release = asyncio.Event()
        self._wrap = wrap

    async def __call__(self, job: Job) -> Any:
        self.started.append(job.job_id)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(job.job_id)
            raise
        self.finished.append(job.job_id)
        return {"done": job.payload} if self._wrap else job.payload
