"""Every exchange and queue modelfleet uses, with its arguments, declared from one place.

A queue declared twice with different arguments is a PRECONDITION_FAILED channel error at run
time, so no other module passes queue arguments. All declarations are idempotent: workers,
controllers and clients each declare what they use, in any order.

=========================  ==========================================================
``{ns}.heartbeats``        fanout exchange; workers publish Heartbeat messages
``{ns}.controller.{id}``   one per controller: its copy of the heartbeats (TTL, capped)
``{ns}.jobs``              direct exchange, routing key = model, alternate-exchange
                           ``{ns}.unroutable``
``{ns}.model.{model}``     quorum queue per model, DLX ``{ns}.dead``; bound to the jobs
                           exchange only while the model has live workers
``{ns}.unroutable``        fanout exchange + quorum queue: jobs no model queue took
``{ns}.dead``              fanout exchange every dead job goes through
``{ns}.errors``            quorum queue behind ``{ns}.dead``: the error queue
``{ns}.catalog``           one message: the models the controllers know, so a restarted
                           controller can fail the backlog of a model that died meanwhile
``{ns}.control``           fanout exchange: ``{"cancel": job_id}`` messages to every worker
``{ns}.control.{id}``      one per worker: its copy of the control messages (TTL, capped)
=========================  ==========================================================
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    ExchangeType,
)

from modelfleet.config import HeartbeatSettings, RoutingSettings

__all__ = ["DeadReason", "Names", "Topology", "dead_reason"]

log = logging.getLogger(__name__)

# Headers modelfleet sets on copies it dead-letters itself (the broker sets x-death on its own).
REASON_HEADER = "x-mf-reason"
ERROR_HEADER = "x-mf-error"
MODEL_HEADER = "x-mf-model"
DEADLINE_HEADER = "x-mf-deadline"  # the producer's deadline, integer epoch milliseconds
DIED_AT_HEADER = "x-mf-died-at"  # when modelfleet dead-lettered it, integer epoch milliseconds


class DeadReason:
    """Why a job reached the error queue (the ``reason`` label of dead-letter metrics)."""

    NO_WORKER = "no_worker"
    EXPIRED = "expired"
    REJECTED = "rejected"
    DELIVERY_LIMIT = "delivery_limit"
    OVERLOADED = "overloaded"
    WORKER_ERROR = "worker_error"
    INVALID = "invalid"


# RabbitMQ's x-death reasons, in our words.
_BROKER_REASONS = {
    "expired": DeadReason.EXPIRED,
    "rejected": DeadReason.REJECTED,
    "delivery_limit": DeadReason.DELIVERY_LIMIT,
    "maxlen": DeadReason.OVERLOADED,
}


def dead_reason(headers: Mapping[str, Any] | None) -> str:
    """The reason of a dead job, from our header or from the broker's x-death records."""
    headers = headers or {}
    ours = headers.get(REASON_HEADER)
    if isinstance(ours, (str, bytes)):
        return ours.decode() if isinstance(ours, bytes) else ours
    first = headers.get("x-first-death-reason")
    if isinstance(first, bytes):
        first = first.decode()
    if isinstance(first, str):
        return _BROKER_REASONS.get(first, first)
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        reason = deaths[0].get("reason")
        if isinstance(reason, bytes):
            reason = reason.decode()
        if isinstance(reason, str):
            return _BROKER_REASONS.get(reason, reason)
    return "unknown"


@dataclass(frozen=True)
class Names:
    """Every name in one namespace. ``Names("modelfleet").model_queue("llama")``."""

    ns: str

    @property
    def heartbeats(self) -> str:
        return f"{self.ns}.heartbeats"

    @property
    def jobs(self) -> str:
        return f"{self.ns}.jobs"

    @property
    def unroutable(self) -> str:
        return f"{self.ns}.unroutable"

    @property
    def dead(self) -> str:
        return f"{self.ns}.dead"

    @property
    def errors(self) -> str:
        return f"{self.ns}.errors"

    @property
    def catalog(self) -> str:
        return f"{self.ns}.catalog"

    def model_queue(self, model: str) -> str:
        return f"{self.ns}.model.{model}"

    def controller_queue(self, instance: str) -> str:
        return f"{self.ns}.controller.{instance}"

    def dead_tap(self, instance: str) -> str:
        return f"{self.ns}.dead.tap.{instance}"

    @property
    def control(self) -> str:
        return f"{self.ns}.control"

    def control_queue(self, instance: str) -> str:
        return f"{self.ns}.control.{instance}"


def model_queue_arguments(names: Names, routing: RoutingSettings) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": names.dead,
        # at-least-once: the broker keeps a dead job until the error queue confirms it.
        "x-dead-letter-strategy": "at-least-once",
        # A full queue refuses publishes (the producer's confirm is a nack -> OVERLOADED);
        # at-least-once dead-lettering requires this overflow mode anyway.
        "x-overflow": "reject-publish",
        "x-max-length": routing.max_queue_length,
        # A job that keeps crashing its workers is dead-lettered, never requeued forever.
        "x-delivery-limit": routing.delivery_limit,
    }


def unroutable_queue_arguments(names: Names) -> dict[str, Any]:
    return {"x-queue-type": "quorum", "x-dead-letter-exchange": names.dead}


def errors_queue_arguments(routing: RoutingSettings) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-max-length": routing.errors_max_length,
        "x-overflow": "drop-head",
    }


def controller_queue_arguments(heartbeat: HeartbeatSettings) -> dict[str, Any]:
    return {
        # Stale heartbeats are worthless: drop them rather than build a backlog.
        "x-message-ttl": int(heartbeat.queue_ttl_s * 1000),
        "x-max-length": heartbeat.queue_max_length,
        "x-overflow": "drop-head",
        # Safety net if a controller vanishes without its connection closing cleanly.
        "x-expires": max(int(heartbeat.timeout_s * 1000) * 10, 60_000),
    }


def _untracked(channel: AbstractChannel, track: bool = False) -> dict[str, Any]:
    """``declare_queue`` keywords that keep a robust channel from remembering a queue.

    A robust channel keeps every queue object it declared (one more per call) and re-declares
    and re-binds all of them when it reopens: a model queue unbound since would be bound again,
    and one re-declared by someone else with other arguments would fail the reopen and leave the
    channel closed for good. Declarations repeated by the controller are therefore untracked."""
    if track or not isinstance(channel, AbstractRobustChannel):
        return {}
    return {"robust": False}


class Topology:
    """Declares and binds modelfleet's exchanges and queues on a channel.

    >>> topo = Topology(Names("modelfleet"), settings.routing, settings.heartbeat)
    >>> await topo.declare_base(channel)
    >>> queue = await topo.declare_model_queue(channel, "llama-3-8b")
    """

    def __init__(
        self,
        names: Names,
        routing: RoutingSettings | None = None,
        heartbeat: HeartbeatSettings | None = None,
    ) -> None:
        self.names = names
        self.routing = routing or RoutingSettings()
        self.heartbeat = heartbeat or HeartbeatSettings()

    async def declare_heartbeats(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(
            self.names.heartbeats, ExchangeType.FANOUT, durable=True
        )

    async def declare_dead(
        self, channel: AbstractChannel, *, track: bool = True
    ) -> AbstractExchange:
        dead = await channel.declare_exchange(self.names.dead, ExchangeType.FANOUT, durable=True)
        errors = await channel.declare_queue(
            self.names.errors,
            durable=True,
            arguments=errors_queue_arguments(self.routing),
            **_untracked(channel, track),
        )
        await errors.bind(dead)
        return dead

    async def declare_jobs(
        self, channel: AbstractChannel, *, track: bool = True
    ) -> AbstractExchange:
        """The jobs exchange with its alternate exchange and the unroutable queue behind it."""
        await self.declare_dead(channel, track=track)
        unroutable = await channel.declare_exchange(
            self.names.unroutable, ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(
            self.names.unroutable,
            durable=True,
            arguments=unroutable_queue_arguments(self.names),
            **_untracked(channel, track),
        )
        await queue.bind(unroutable)
        return await channel.declare_exchange(
            self.names.jobs,
            ExchangeType.DIRECT,
            durable=True,
            arguments={"alternate-exchange": self.names.unroutable},
        )

    async def declare_unroutable_queue(self, channel: AbstractChannel) -> AbstractQueue:
        """The unroutable queue with its binding, for its consumer: a robust channel that
        remembers both re-creates them when it restores the consumer (queue deleted)."""
        queue = await channel.declare_queue(
            self.names.unroutable, durable=True, arguments=unroutable_queue_arguments(self.names)
        )
        await queue.bind(self.names.unroutable)
        return queue

    async def declare_base(self, channel: AbstractChannel, *, track: bool = True) -> None:
        """Everything but model and controller queues. ``track=False``: a robust channel does not
        remember the queues (for declarations repeated to heal the topology; see _untracked)."""
        await self.declare_heartbeats(channel)
        await self.declare_jobs(channel, track=track)
        await self.declare_control(channel)
        await channel.declare_queue(
            self.names.catalog,
            durable=True,
            arguments={"x-max-length": 1},
            **_untracked(channel, track),
        )

    async def declare_model_queue(
        self, channel: AbstractChannel, model: str, *, track: bool = True
    ) -> AbstractQueue:
        """Declare ``{ns}.model.{model}`` (not bound: the controller binds live models)."""
        return await channel.declare_queue(
            self.names.model_queue(model),
            durable=True,
            arguments=model_queue_arguments(self.names, self.routing),
            **_untracked(channel, track),
        )

    async def declare_controller_queue(
        self, channel: AbstractChannel, instance: str
    ) -> AbstractQueue:
        # Not exclusive: a robust connection re-declares it after a reconnect, and an exclusive
        # queue of the dead connection may still be there (RESOURCE_LOCKED). auto_delete and
        # x-expires remove it once its controller is gone.
        queue = await channel.declare_queue(
            self.names.controller_queue(instance),
            durable=False,
            auto_delete=True,
            arguments=controller_queue_arguments(self.heartbeat),
        )
        await queue.bind(self.names.heartbeats)
        return queue

    async def declare_dead_tap(
        self, channel: AbstractChannel, instance: str, *, track: bool = True
    ) -> AbstractQueue:
        """A controller's own copy of every dead letter, to count them; the error queue itself
        is left for people and tools. Short TTL and a cap: counting must never build a backlog.
        Declared again (``track=False``) when the base topology is healed: a ``{ns}.dead``
        deleted and declared again has lost the tap's binding."""
        queue = await channel.declare_queue(
            self.names.dead_tap(instance),
            durable=False,
            auto_delete=True,
            arguments=controller_queue_arguments(self.heartbeat),
            **_untracked(channel, track),
        )
        await queue.bind(self.names.dead)
        return queue

    async def declare_control(self, channel: AbstractChannel) -> AbstractExchange:
        """The control exchange: producers publish job cancellations, every worker gets them."""
        return await channel.declare_exchange(self.names.control, ExchangeType.FANOUT, durable=True)

    async def declare_control_queue(self, channel: AbstractChannel, instance: str) -> AbstractQueue:
        """A worker's own copy of the control messages: auto-delete, short TTL, capped (the
        same arguments as a controller's heartbeat queue, for the same reasons)."""
        queue = await channel.declare_queue(
            self.names.control_queue(instance),
            durable=False,
            auto_delete=True,
            arguments=controller_queue_arguments(self.heartbeat),
        )
        await queue.bind(self.names.control)
        return queue

    async def bind_model(self, channel: AbstractChannel, model: str) -> None:
        # Untracked: a robust channel would re-bind it on every reopen, even after an unbind.
        queue = await self.declare_model_queue(channel, model, track=False)
        await queue.bind(self.names.jobs, routing_key=model)

    async def unbind_model(self, channel: AbstractChannel, model: str) -> None:
        queue = await self.declare_model_queue(channel, model, track=False)
        await queue.unbind(self.names.jobs, routing_key=model)

    async def queue_counts(self, channel: AbstractChannel, model: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of a model queue now, or None if it does not exist.

        Asked of the broker every time: a robust channel's passive ``declare_queue`` answers a
        name it has seen from its cache, frozen at the first count. A passive declare of a
        missing queue closes the channel: use a channel kept for this.
        """
        underlay = await channel.get_underlay_channel()
        try:
            result = await underlay.queue_declare(self.names.model_queue(model), passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        return int(result.message_count or 0), int(result.consumer_count or 0)

    async def delete(
        self, channel: AbstractChannel, models: list[str] | tuple[str, ...] = ()
    ) -> None:
        """Delete the namespace's queues and exchanges (tests, ``modelfleet`` clean-up)."""
        for model in models:
            await channel.queue_delete(self.names.model_queue(model))
        for queue in (self.names.unroutable, self.names.errors, self.names.catalog):
            await channel.queue_delete(queue)
        for exchange in (
            self.names.jobs,
            self.names.unroutable,
            self.names.dead,
            self.names.heartbeats,
            self.names.control,
        ):
            await channel.exchange_delete(exchange)


def dead_copy(
    message: AbstractIncomingMessage, *, reason: str, error: str, model: str
) -> aio_pika.Message:
    """The copy of a failed job that goes to ``{ns}.dead`` (and on to the error queue): the job's
    body and identity, with why it failed in our headers. No expiration: the copy must not expire
    in the error queue the way the job would have in its model queue."""
    headers: dict[str, Any] = dict(message.headers or {})
    headers.update({REASON_HEADER: reason, ERROR_HEADER: error[:1000], MODEL_HEADER: model})
    # Integer milliseconds: an AMQP table carries a float as 32 bits (seconds would round).
    headers[DIED_AT_HEADER] = round(time.time() * 1000)
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        timestamp=message.timestamp,
        type="job",
    )


def json_message(body: bytes, **properties: Any) -> aio_pika.Message:
    """A JSON AMQP message (helper so every module builds them the same way)."""
    return aio_pika.Message(body, content_type="application/json", **properties)
