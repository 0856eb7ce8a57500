"""Publishing on the job path: jobs from the client, replies from the worker.

aio-pika's ``Exchange.publish`` asks aiormq to wait until the frame has been written and the
socket drained, and aiormq holds the channel's lock for that wait. Concurrent publishes on one
channel therefore go out one at a time, each a few turns of the event loop after the last. With
``wait=False`` the lock is released as soon as the frame is in aiormq's write queue, so the jobs
of one turn go out back to back. Nothing is given up: the write queue is bounded (a publisher
still waits when it is full), and on a channel with publisher confirms the publish still returns
only once the broker has confirmed it (a nack raises ``DeliveryError``, as before).

Properties are built as pamqp ``Basic.Properties`` directly, skipping aio-pika's ``Message``,
whose per-attribute conversions cost as much as the publish itself (py-spy, bench/README.md).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq import spec

__all__ = ["job_properties", "publish", "publish_on", "reply_properties"]

JSON = "application/json"
PERSISTENT = 2


def job_properties(
    job_id: str, *, reply_to: str, ttl_s: float, headers: dict[str, Any], now: float
) -> spec.Basic.Properties:
    """A job's properties: persistent, its id as message and correlation id, its time-to-live
    as the expiration (whole milliseconds, at least 1)."""
    return spec.Basic.Properties(
        content_type=JSON,
        delivery_mode=PERSISTENT,
        message_id=job_id,
        correlation_id=job_id,
        reply_to=reply_to,
        expiration=str(max(1, int(ttl_s * 1000))),
        headers=headers,
        timestamp=datetime.fromtimestamp(int(now), tz=UTC),
        message_type="job",
    )


def reply_properties(correlation_id: str | None, kind: str) -> spec.Basic.Properties:
    """A reply's properties: transient (direct reply-to keeps nothing), typed by its kind."""
    return spec.Basic.Properties(
        content_type=JSON, correlation_id=correlation_id, message_type=kind
    )


async def publish(
    channel: AbstractChannel,
    body: bytes,
    properties: spec.Basic.Properties,
    *,
    exchange: str,
    routing_key: str,
    flush: bool = False,
) -> None:
    """Publish without waiting for the socket to drain, or, with ``flush``, wait until it is
    written (and so sent at once by a coalescing connection: a stream's first chunk).
    ``mandatory`` is off: modelfleet catches unroutable jobs with an alternate exchange, and a
    mandatory reply to direct reply-to is both delivered and returned by RabbitMQ 3.10."""
    await publish_on(
        await channel.get_underlay_channel(),
        body,
        properties,
        exchange=exchange,
        routing_key=routing_key,
        flush=flush,
    )


async def publish_on(
    underlay: aiormq.abc.AbstractChannel,
    body: bytes,
    properties: spec.Basic.Properties,
    *,
    exchange: str,
    routing_key: str,
    flush: bool = False,
) -> None:
    """:func:`publish` on one given aiormq channel: the client publishes a job only on the
    channel its reply consumer is on (direct reply-to answers come back on that channel alone),
    and a closed one raises rather than publishing on its successor."""
    if isinstance(underlay, aiormq.Channel):
        await underlay.basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=False,
            wait=flush,
        )
    else:  # another implementation of aiormq's channel: its own defaults
        await underlay.basic_publish(
            body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=False
        )
