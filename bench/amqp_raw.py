"""A minimal AMQP 0-9-1 publisher that writes pre-encoded frames: the broker's own ceiling.

Every message is encoded once (method + content header + body frames, with pamqp, which aiormq
already depends on); publishing is then writing big byte buffers to the socket, so the figure is
what RabbitMQ ingests on one connection, not what a Python client costs per message. Publisher
confirms are on and acked in batches by the broker (``multiple``), so the clock stops when the
broker has taken every message into its queue (for a quorum queue: committed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from urllib.parse import unquote, urlsplit

from pamqp import commands, frame, header, heartbeat
from pamqp.body import ContentBody
from pamqp.exceptions import UnmarshalingException

__all__ = ["RawPublisher", "encode_publish"]

CHANNEL = 1


def encode_publish(
    exchange: str,
    routing_key: str,
    body: bytes,
    *,
    content_type: str | None = "application/json",
    delivery_mode: int | None = None,
    expiration_ms: int | None = None,
    message_type: str | None = None,
) -> bytes:
    """One message as the bytes of its three frames (method, content header, body)."""
    properties = commands.Basic.Properties(
        content_type=content_type,
        delivery_mode=delivery_mode,
        expiration=None if expiration_ms is None else str(expiration_ms),
        message_type=message_type,
    )
    return b"".join(
        (
            frame.marshal(
                commands.Basic.Publish(exchange=exchange, routing_key=routing_key), CHANNEL
            ),
            frame.marshal(header.ContentHeader(0, len(body), properties), CHANNEL),
            frame.marshal(ContentBody(body), CHANNEL),
        )
    )


class RawPublisher:
    """One connection, one channel in confirm mode, pre-encoded publishes.

    >>> pub = await RawPublisher.connect("amqp://guest:guest@127.0.0.1/")
    >>> frames = encode_publish("", "some-queue", b"x" * 256)
    >>> await pub.publish_encoded([frames * 1000] * 100, count=100_000)
    >>> await pub.close()
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._buffer = b""
        self._published = 0
        self._acked = 0
        self.nacked = 0
        self._progress = asyncio.Event()
        self._failure: BaseException | None = None
        self._read_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, url: str) -> RawPublisher:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 5672)
        self = cls(reader, writer)
        try:
            await self._handshake(
                unquote(parts.username or "guest"),
                unquote(parts.password or "guest"),
                unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
            )
        except BaseException:
            writer.close()
            raise
        self._read_task = asyncio.create_task(self._read_loop())
        return self

    async def _frame(self) -> tuple[int, object]:
        while True:
            if self._buffer:
                try:
                    used, channel, value = frame.unmarshal(self._buffer)
                except UnmarshalingException:
                    pass  # not a whole frame yet
                else:
                    self._buffer = self._buffer[used:]
                    return channel, value
            data = await self._reader.read(1 << 16)
            if not data:
                raise ConnectionError("the broker closed the connection")
            self._buffer += data

    async def _expect(self, kind: type) -> object:
        while True:
            _, value = await self._frame()
            if isinstance(value, kind):
                return value
            if isinstance(value, (commands.Connection.Close, commands.Channel.Close)):
                raise ConnectionError(f"broker closed: {value.reply_code} {value.reply_text}")

    def _send(self, value: object, channel: int = 0) -> None:
        self._writer.write(frame.marshal(value, channel))  # type: ignore[arg-type]

    async def _handshake(self, user: str, password: str, vhost: str) -> None:
        self._writer.write(header.ProtocolHeader().marshal())
        await self._expect(commands.Connection.Start)
        self._send(
            commands.Connection.StartOk(
                client_properties={"product": "modelfleet-bench raw publisher"},
                response=f"\0{user}\0{password}",
            )
        )
        tune = await self._expect(commands.Connection.Tune)
        assert isinstance(tune, commands.Connection.Tune)
        # No AMQP heartbeats: a run lasts seconds, and the reader would have to answer them.
        self._send(commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        self._send(commands.Connection.Open(virtual_host=vhost))
        await self._expect(commands.Connection.OpenOk)
        self._send(commands.Channel.Open(), CHANNEL)
        await self._expect(commands.Channel.OpenOk)
        self._send(commands.Confirm.Select(), CHANNEL)
        await self._expect(commands.Confirm.SelectOk)

    async def _read_loop(self) -> None:
        try:
            while True:
                _, value = await self._frame()
                if isinstance(value, commands.Basic.Ack):
                    self._acked = max(self._acked, value.delivery_tag)
                elif isinstance(value, commands.Basic.Nack):
                    self.nacked += 1
                    self._acked = max(self._acked, value.delivery_tag)
                elif isinstance(value, (commands.Connection.Close, commands.Channel.Close)):
                    raise ConnectionError(
                        f"broker closed the connection: {value.reply_code} {value.reply_text}"
                    )
                elif isinstance(value, heartbeat.Heartbeat):
                    continue
                self._progress.set()
        except BaseException as exc:
            self._failure = exc
            self._progress.set()
            if not isinstance(exc, (asyncio.CancelledError, ConnectionError)):
                raise

    async def publish_encoded(self, buffers: Iterable[bytes], count: int) -> None:
        """Write ``buffers`` (holding ``count`` encoded messages in all) and wait for the
        broker's confirms of every one of them."""
        target = self._published + count
        for buffer in buffers:
            self._writer.write(buffer)
            await self._writer.drain()
        self._published = target
        while self._acked < target:
            if self._failure is not None:
                raise ConnectionError(f"raw publisher failed: {self._failure!r}")
            self._progress.clear()
            await self._progress.wait()

    async def close(self) -> None:
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._read_task
        with contextlib.suppress(Exception):
            self._send(commands.Connection.Close(reply_code=200, reply_text="bye"))
            await asyncio.wait_for(self._writer.drain(), 1)
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1)


def batches(encoded: Sequence[bytes], size: int = 2000) -> list[bytes]:
    """Join encoded messages into buffers of ``size`` messages (fewer, larger writes)."""
    return [b"".join(encoded[i : i + size]) for i in range(0, len(encoded), size)]
