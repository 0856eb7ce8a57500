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

**A channel the broker closes must not take the connection with it.** On reading the broker's
Channel.Close, aiormq queues the CloseOk and records the error (``_close_exception``) at once,
but reports ``is_closed`` only a few loop turns later, and its ``basic_publish`` checks nothing:
a frame written after the CloseOk reaches a channel the broker has closed, and the broker
closes the whole connection (504 CHANNEL_ERROR, expected 'channel.open'), failing every job,
reply and ack on it. Under load that is the rule, not the exception: publishes wait for room in
the connection's bounded write queue (holding the channel's lock) and are queued after the
CloseOk. Two guards, both at this edge and both below aio-pika's public API (listed with
the others in :mod:`modelfleet.connections`):

* :func:`publish_on` refuses a channel that started closing (:func:`closing`) with
  :class:`aiormq.exceptions.ChannelInvalidStateError`, which callers treat as "channel down,
  try again once it is back";
* :func:`guard_channel` makes the channel's frames go through :class:`_GuardedWriteQueue`,
  which drops a frame whose channel started closing by the time the connection's writer takes
  it. Frames come out in queue order and the error is recorded before the CloseOk is queued,
  so no frame of the channel can follow its CloseOk onto the wire. A dropped publish is never
  confirmed: aiormq fails its confirmation when the channel closes, as for any publish cut
  short by a close.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq import spec
from aiormq.abc import ChannelFrame

__all__ = [
    "closing",
    "guard_channel",
    "job_properties",
    "publish",
    "publish_on",
    "reply_properties",
]

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


def closing(underlay: aiormq.abc.AbstractChannel) -> bool:
    """Has ``underlay`` started closing? True as soon as the broker's Channel.Close was read.

    aiormq queues the CloseOk and records the error on reading Channel.Close, but the channel
    reports ``is_closed`` only a few loop turns later, and its ``basic_publish`` checks nothing:
    a publish queued after the CloseOk reaches the broker on a channel it has closed, and the
    broker then closes the whole connection (504 CHANNEL_ERROR, expected 'channel.open').
    """
    # is_closed, not the `closing` property: that one makes a new future per call.
    return getattr(underlay, "_close_exception", None) is not None or underlay.is_closed


class _GuardedFrame:
    """One frame in the connection's write queue, written only if its channel has not started
    closing by the time the writer takes it (the attributes aiormq's writer reads)."""

    __slots__ = ("_channel", "_frame")

    def __init__(self, frame: ChannelFrame, channel: aiormq.abc.AbstractChannel) -> None:
        self._frame = frame
        self._channel = channel

    @property
    def payload(self) -> bytes:
        return b"" if closing(self._channel) else self._frame.payload

    @property
    def should_close(self) -> bool:
        return self._frame.should_close

    @property
    def should_drain(self) -> bool:
        return self._frame.should_drain

    def drain(self) -> None:
        self._frame.drain()


class _GuardedWriteQueue:
    """A channel's view of its connection's write queue: what the channel puts is wrapped in a
    :class:`_GuardedFrame`, except ``put_nowait`` (aiormq's CloseOk, which must go out)."""

    __slots__ = ("_channel", "_queue")

    def __init__(self, queue: asyncio.Queue[Any], channel: aiormq.abc.AbstractChannel) -> None:
        self._queue = queue
        self._channel = channel

    async def put(self, frame: ChannelFrame) -> None:
        await self._queue.put(_GuardedFrame(frame, self._channel))

    def put_nowait(self, frame: ChannelFrame) -> None:
        self._queue.put_nowait(frame)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


def guard_channel(underlay: aiormq.abc.AbstractChannel) -> None:
    """Never let a frame of ``underlay`` follow its CloseOk (module docstring); idempotent. A
    channel of another implementation is left alone."""
    if isinstance(underlay, aiormq.Channel) and type(underlay.write_queue) is asyncio.Queue:
        underlay.write_queue = _GuardedWriteQueue(  # type: ignore[assignment]
            underlay.write_queue, underlay
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
    and a closed one raises rather than publishing on its successor.

    A channel that started closing raises :class:`aiormq.exceptions.ChannelInvalidStateError`
    (see :func:`closing`): nothing is handed to aiormq then. A publish already waiting inside
    aiormq (for the channel's lock, or room in the write queue) when the Close arrives is
    dropped at the write queue instead (:func:`guard_channel`, installed here once).
    """
    if closing(underlay):
        raise aiormq.exceptions.ChannelInvalidStateError(
            f"channel {getattr(underlay, 'number', '?')} is closing"
        )
    if isinstance(underlay, aiormq.Channel):
        if type(underlay.write_queue) is asyncio.Queue:
            guard_channel(underlay)
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
