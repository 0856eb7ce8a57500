"""AckBatcher against a real quorum queue: finished deliveries are settled in few frames, and a
delivery still running is never covered by a multiple ack."""

from __future__ import annotations

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
