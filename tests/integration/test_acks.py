"""AckBatcher against a real quorum queue: finished deliveries are settled in few frames, and a
delivery still running is never covered by a multiple ack."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from modelfleet.acks import AckBatcher
from modelfleet.topology import Topology
from tests.conftest import Namespace
from tests.helpers import wait_for

COUNT = 20


async def _settle_all_but(ns: Namespace, running: set[int]) -> tuple[AckBatcher, list[bytes]]:
    """Deliver COUNT jobs, ack every one but the indexes in ``running`` through a batcher, close
    the channel; returns the batcher and the bodies the broker holds afterwards."""
    settings = ns.settings()
    model = ns.model("acks")
    connection = await aio_pika.connect(ns.amqp_url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=COUNT)
        queue = await Topology(ns.names, settings.routing, settings.heartbeat).declare_model_queue(
            channel, model
        )
        for i in range(COUNT):
            await channel.default_exchange.publish(
                aio_pika.Message(str(i).encode()), routing_key=queue.name
            )
        got: list[AbstractIncomingMessage] = []

        async def on_message(message: AbstractIncomingMessage) -> None:
            got.append(message)

        await queue.consume(on_message)
        await wait_for(lambda: len(got) == COUNT, what=f"{COUNT} deliveries")
        batcher = AckBatcher()
        for message in got:
            assert message.delivery_tag is not None
            batcher.delivered(message.channel, message.delivery_tag)
        for i, message in enumerate(got):
            if i not in running:
                assert message.delivery_tag is not None
                batcher.ack(message.channel, message.delivery_tag)
        assert batcher.pending == COUNT - len(running)
        await batcher.aclose()
        assert batcher.pending == 0
        await channel.close()  # the running ones go back to the queue

        check = await connection.channel()
        passive = await check.declare_queue(queue.name, passive=True)

        async def ready() -> bool:
            declared = await check.declare_queue(queue.name, passive=True)
            return declared.declaration_result.message_count == len(running)

        await wait_for(ready, what=f"{len(running)} job(s) back in the queue")
        left = []
        while (message := await passive.get(fail=False, no_ack=True)) is not None:
            left.append(message.body)
        return batcher, left
    finally:
        await connection.close()


async def test_jobs_finished_in_one_turn_take_one_ack_frame(ns: Namespace) -> None:
    batcher, left = await _settle_all_but(ns, {COUNT - 1})
    assert batcher.acked == COUNT - 1
    assert batcher.frames == 1
    assert left == [str(COUNT - 1).encode()]


@pytest.mark.parametrize(
    ("running", "frames"),
    [
        (set(), 1),  # all finished: one multiple ack
        ({4, 12}, 1 + 14),  # 0-3 in one frame; 5-11 and 13-19 one by one
        ({0}, COUNT - 1),  # the oldest still runs: no multiple ack can be sent
    ],
)
async def test_a_running_job_is_never_acked(ns: Namespace, running: set[int], frames: int) -> None:
    batcher, left = await _settle_all_but(ns, running)
    assert batcher.acked == COUNT - len(running)
    assert batcher.frames == frames
    assert sorted(left) == sorted(str(i).encode() for i in running)


class _Gated:
    """The real channel, with one kind of settling frame held back until ``gate`` opens: it
    forces a nack and a batch of acks to be under way at the same time (the interleaving that a
    busy write queue produces by chance under load)."""

    def __init__(self, channel: Any, held: str) -> None:
        self.channel = channel
        self.held = held
        self.reached = asyncio.Event()
        self.gate = asyncio.Event()

    @property
    def is_closed(self) -> bool:
        return bool(self.channel.is_closed)

    async def _hold(self, kind: str) -> None:
        if kind == self.held:
            self.reached.set()
            await self.gate.wait()

    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        await self._hold("ack")
        await self.channel.basic_ack(delivery_tag, multiple=multiple, wait=wait)

    async def basic_nack(
        self, delivery_tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True
    ) -> None:
        await self._hold("nack")
        await self.channel.basic_nack(delivery_tag, multiple=multiple, requeue=requeue, wait=wait)

    async def basic_reject(
        self, delivery_tag: int, *, requeue: bool = True, wait: bool = True
    ) -> None:
        await self._hold("nack")
        await self.channel.basic_reject(delivery_tag, requeue=requeue, wait=wait)


@pytest.mark.parametrize("held", ["nack", "ack"])
async def test_a_multiple_ack_never_overtakes_a_nack(ns: Namespace, held: str) -> None:
    """Job 0 is handed back while jobs 1 and 2 finish. Whichever frame is slow to reach the
    write queue, the ack batch must not cover job 0: it comes back, and the channel lives."""
    settings = ns.settings()
    model = ns.model("acks")
    connection = await aio_pika.connect(ns.amqp_url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=3)
        queue = await Topology(ns.names, settings.routing, settings.heartbeat).declare_model_queue(
            channel, model
        )
        for i in range(3):
            await channel.default_exchange.publish(
                aio_pika.Message(str(i).encode()), routing_key=queue.name
            )
        got: list[AbstractIncomingMessage] = []

        async def on_message(message: AbstractIncomingMessage) -> None:
            got.append(message)

        await queue.consume(on_message)
        await wait_for(lambda: len(got) == 3, what="3 deliveries")
        gated = _Gated(got[0].channel, held)
        batcher = AckBatcher()
        tags = [m.delivery_tag for m in got]
        assert None not in tags
        for tag in tags:
            assert tag is not None
            batcher.delivered(gated, tag)

        if held == "nack":
            # The nack of job 0 is decided and under way; the finished jobs' batch is planned
            # and flushed meanwhile (it waits for no ack, so it would go out first).
            handing_back = asyncio.create_task(batcher.nack(gated, tags[0] or 0))
            await gated.reached.wait()
            batcher.ack(gated, tags[1] or 0)
            batcher.ack(gated, tags[2] or 0)
        else:
            # The batch of finished jobs is being written when job 0 is handed back.
            batcher.ack(gated, tags[1] or 0)
            batcher.ack(gated, tags[2] or 0)
            await gated.reached.wait()
            handing_back = asyncio.create_task(batcher.nack(gated, tags[0] or 0))
        for _ in range(5):  # let every task that can run now run (no assertion rests on this)
            await asyncio.sleep(0)
        gated.gate.set()
        await handing_back
        await batcher.aclose()
        assert batcher.acked == 2

        # The consumer is still on: job 0 comes straight back to it, as a redelivery.
        await wait_for(lambda: len(got) == 4, what="job 0 delivered again")
        assert got[3].body == b"0"
        assert got[3].redelivered
        # No "unknown delivery tag": the consuming channel is still open.
        assert not channel.is_closed
        assert not got[0].channel.is_closed
        assert batcher.channels == 1
    finally:
        await connection.close()


async def test_the_channels_of_closed_connections_are_forgotten(ns: Namespace) -> None:
    """A worker that reconnects many times must not keep every dead channel it had."""
    settings = ns.settings()
    model = ns.model("acks")
    batcher = AckBatcher()
    for round_ in range(3):
        connection = await aio_pika.connect(ns.amqp_url)
        try:
            channel = await connection.channel()
            queue = await Topology(
                ns.names, settings.routing, settings.heartbeat
            ).declare_model_queue(channel, model)
            await channel.default_exchange.publish(
                aio_pika.Message(str(round_).encode()), routing_key=queue.name
            )
            message = await queue.get(timeout=5)
            assert message is not None and message.delivery_tag is not None
            # Delivered and never settled: the connection dies with the job running.
            batcher.delivered(message.channel, message.delivery_tag)
            assert batcher.channels == 1
        finally:
            await connection.close()
    live = await aio_pika.connect(ns.amqp_url)
    try:
        channel = await live.channel()
        queue = await channel.declare_queue(ns.names.model_queue(model), passive=True)
        message = await queue.get(timeout=5)
        assert message is not None and message.delivery_tag is not None
        batcher.delivered(message.channel, message.delivery_tag)
        batcher.ack(message.channel, message.delivery_tag)
        await batcher.aclose()
        assert batcher.channels == 1  # the live one only
        assert batcher.acked == 1
    finally:
        await live.close()


async def test_a_nack_cancelled_before_its_frame_is_queued_leaves_the_job_unsettled(
    ns: Namespace,
) -> None:
    """A hand-back's nack waits for room in aiormq's write queue (10 frames) and is cancelled
    there (a stop's grace ran out): no frame was sent, so the job must stay unsettled. The acks
    of the jobs that finished meanwhile must not cover it, the nack sent again must reach the
    broker (job 0 comes back), and a third settlement of it must send nothing (a second frame
    for one tag is "unknown delivery tag", which closes the channel).

    The held nack stands in for the full write queue: aiormq's ``basic_nack(wait=False)`` has
    no other await, so one cancelled there has queued nothing. Filling the real queue from a
    test cannot be timed: its writer drains it in the same loop turn."""
    settings = ns.settings()
    model = ns.model("acks")
    connection = await aio_pika.connect(ns.amqp_url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=3)
        queue = await Topology(ns.names, settings.routing, settings.heartbeat).declare_model_queue(
            channel, model
        )
        for i in range(3):
            await channel.default_exchange.publish(
                aio_pika.Message(str(i).encode()), routing_key=queue.name
            )
        got: list[AbstractIncomingMessage] = []

        async def on_message(message: AbstractIncomingMessage) -> None:
            got.append(message)

        await queue.consume(on_message)
        await wait_for(lambda: len(got) == 3, what="3 deliveries")
        gated = _Gated(got[0].channel, "nack")
        batcher = AckBatcher()
        tags = [m.delivery_tag or 0 for m in got]
        for tag in tags:
            batcher.delivered(gated, tag)

        handing_back = asyncio.create_task(batcher.nack(gated, tags[0]))
        await gated.reached.wait()
        handing_back.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handing_back
        batcher.ack(gated, tags[1])
        batcher.ack(gated, tags[2])
        await batcher.flush(drain=True)
        assert batcher.acked == 2
        gated.gate.set()
        await batcher.nack(gated, tags[0])  # the cancel path hands it back again
        await batcher.nack(gated, tags[0])  # settled: sends nothing
        await batcher.aclose()

        await wait_for(lambda: len(got) == 4, what="job 0 delivered again")
        assert got[3].body == b"0"
        assert got[3].redelivered
        assert not got[0].channel.is_closed
    finally:
        await connection.close()
