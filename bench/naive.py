"""The floor: a naive aio-pika RPC, written the way the aio-pika docs suggest.

* Client: one connection, one channel with aio-pika's defaults (publisher confirms on), publishes
  the request to a quorum queue through the default exchange with ``reply_to`` set to RabbitMQ's
  direct reply-to, and matches replies by correlation id (a future per request).
* Worker (``python -m bench.naive --queue Q``): one connection, one channel with aio-pika's
  defaults, ``prefetch_count`` = the same concurrency modelfleet's workers get; for each
  delivery ``async with message.process()`` (ack one by one), ``json.loads`` the body, publish the
  reply (``json.dumps``) to ``reply_to`` and wait for its confirm.

The queue is a durable quorum queue and requests are persistent, as modelfleet's model queues and
jobs are, so the comparison is about Python overhead, not broker guarantees. The one departure
from defaults: replies go out with ``mandatory=False``, because with aio-pika's default
(``mandatory=True``) RabbitMQ 3.10 both delivers and returns a reply to a direct reply-to
address (DESIGN.md) and the floor would be slowed by a known pitfall rather than by Python.

``--chunks N`` makes the worker stream: N chunk replies, then a final reply (type ``final``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

__all__ = ["NaiveClient", "declare_queue", "serve"]

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


async def declare_queue(channel: aio_pika.abc.AbstractChannel, name: str) -> Any:
    return await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})


async def serve(url: str, queue_name: str, prefetch: int, chunks: int) -> None:
    """Consume ``queue_name`` until SIGTERM/SIGINT; echo each request (or stream ``chunks``)."""
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await declare_queue(channel, queue_name)
    exchange = channel.default_exchange

    async def on_message(message: AbstractIncomingMessage) -> None:
        async with message.process():
            request = json.loads(message.body)
            if chunks:
                for seq in range(chunks):
                    await exchange.publish(
                        aio_pika.Message(
                            json.dumps({"seq": seq, "data": {"i": seq}}).encode(),
                            correlation_id=message.correlation_id,
                            type="chunk",
                        ),
                        routing_key=message.reply_to or "",
                        mandatory=False,
                    )
            await exchange.publish(
                aio_pika.Message(
                    json.dumps({"result": request}).encode(),
                    correlation_id=message.correlation_id,
                    type="final",
                ),
                routing_key=message.reply_to or "",
                mandatory=False,
            )

    await queue.consume(on_message)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


class NaiveClient:
    """The producer side of the naive RPC."""

    def __init__(self, url: str, queue_name: str) -> None:
        self.url = url
        self.queue_name = queue_name
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._waiters: dict[str, asyncio.Queue[AbstractIncomingMessage]] = {}

    async def __aenter__(self) -> NaiveClient:
        self._connection = await aio_pika.connect(self.url)
        channel = await self._connection.channel()
        await declare_queue(channel, self.queue_name)
        replies = await channel.declare_queue(DIRECT_REPLY_TO, passive=True)
        await replies.consume(self._on_reply, no_ack=True)
        self._exchange = channel.default_exchange
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        waiter = self._waiters.get(message.correlation_id or "")
        if waiter is not None:
            waiter.put_nowait(message)

    async def _send(self, payload: Any) -> tuple[str, asyncio.Queue[AbstractIncomingMessage]]:
        assert self._exchange is not None
        correlation_id = uuid.uuid4().hex
        replies: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._waiters[correlation_id] = replies
        await self._exchange.publish(
            aio_pika.Message(
                json.dumps(payload).encode(),
                content_type="application/json",
                correlation_id=correlation_id,
                reply_to=DIRECT_REPLY_TO,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=self.queue_name,
        )
        return correlation_id, replies

    async def call(self, payload: Any) -> Any:
        correlation_id, replies = await self._send(payload)
        try:
            message = await replies.get()
            return json.loads(message.body)["result"]
        finally:
            del self._waiters[correlation_id]

    async def stream(self, payload: Any, on_chunk: Any = None) -> int:
        """Run a streamed request; ``on_chunk()`` is called at each chunk; returns chunks."""
        correlation_id, replies = await self._send(payload)
        count = 0
        try:
            while True:
                message = await replies.get()
                if message.type == "final":
                    return count
                json.loads(message.body)
                count += 1
                if on_chunk is not None:
                    on_chunk()
        finally:
            del self._waiters[correlation_id]


def main() -> None:
    parser = argparse.ArgumentParser(description="naive aio-pika RPC worker (benchmark floor)")
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--prefetch", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.url, args.queue, args.prefetch, args.chunks))


if __name__ == "__main__":
    main()
