"""Coalesced socket writes against a real broker: the frames of one loop turn go out in one
write, in order, and nothing is lost; the setting turns it off."""

from __future__ import annotations

import asyncio

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from modelfleet.coalesce import CoalescingRobustConnection
from modelfleet.connections import connect
from modelfleet.publishing import publish, reply_properties
from tests.conftest import Namespace
from tests.helpers import wait_for

COUNT = 200


async def test_one_turn_of_publishes_is_one_write_and_arrives_in_order(ns: Namespace) -> None:
    settings = ns.settings()
    connection = await connect(settings.amqp, role="test")
    try:
        assert isinstance(connection, CoalescingRobustConnection)
        writer = connection.transport_factory.writer
        assert writer is not None
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(f"{ns.name}.coalesce", exclusive=True)
        got: list[bytes] = []

        async def on_message(message: AbstractIncomingMessage) -> None:
            got.append(message.body)

        await queue.consume(on_message, no_ack=True)
        writes, sends = writer.writes, writer.sends
        await asyncio.gather(
            *(
                publish(
                    channel,
                    str(i).encode(),
                    reply_properties(str(i), "reply"),
                    exchange="",
                    routing_key=queue.name,
                )
                for i in range(COUNT)
            )
        )  # every publish confirmed by the broker
        await wait_for(lambda: len(got) == COUNT, what=f"{COUNT} messages")
        assert got == [str(i).encode() for i in range(COUNT)]
        assert writer.writes - writes >= COUNT
        assert writer.sends - sends < (writer.writes - writes) / 4
    finally:
        await connection.close()


async def test_coalescing_can_be_turned_off(ns: Namespace) -> None:
    settings = ns.settings(amqp={"coalesce_writes": False})
    connection = await connect(settings.amqp, role="test")
    try:
        assert not isinstance(connection, CoalescingRobustConnection)
        assert isinstance(connection, aio_pika.RobustConnection)
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{ns.name}.plain", exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=queue.name)
        message = await queue.get(timeout=5)
        assert message.body == b"x"
    finally:
        await connection.close()
