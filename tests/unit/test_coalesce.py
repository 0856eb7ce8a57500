"""CoalescingWriter over a real loopback socket: when it sends, and how much at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from modelfleet.coalesce import CoalescingWriter


@pytest.fixture
async def pair() -> AsyncIterator[tuple[asyncio.StreamWriter, asyncio.StreamReader]]:
    """A connected (client writer, server reader) pair on 127.0.0.1."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    reader, server_side = await asyncio.wait_for(accepted.get(), 5)
    yield writer, reader
    for end in (writer, server_side):
        end.close()
        with contextlib.suppress(OSError):
            await end.wait_closed()
    server.close()
    await server.wait_closed()


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_lone_write_is_sent_two_turns_later(
    pair: tuple[asyncio.StreamWriter, asyncio.StreamReader],
) -> None:
    raw, reader = pair
    writer = CoalescingWriter(raw)
    writer.write(b"abc")
    assert writer.sends == 0
    await _turns(3)
    assert writer.sends == 1
    assert await asyncio.wait_for(reader.readexactly(3), 5) == b"abc"


async def test_writes_that_keep_coming_go_out_together_within_max_turns(
    pair: tuple[asyncio.StreamWriter, asyncio.StreamReader],
) -> None:
    raw, reader = pair
    writer = CoalescingWriter(raw, max_turns=4)
    for i in range(10):  # one write a turn, like publishes through aiormq's channel lock
        writer.write(bytes([i]))
        await asyncio.sleep(0)
    await _turns(3)
    assert writer.writes == 10
    assert 2 <= writer.sends <= 3  # bounded by max_turns: never one send a write, never none
    assert await asyncio.wait_for(reader.readexactly(10), 5) == bytes(range(10))


async def test_max_bytes_sends_a_full_buffer_at_once(
    pair: tuple[asyncio.StreamWriter, asyncio.StreamReader],
) -> None:
    raw, reader = pair
    writer = CoalescingWriter(raw, max_bytes=100)
    writer.write(b"x" * 60)
    await asyncio.sleep(0)
    writer.write(b"y" * 60)  # 120 bytes collected: the next look sends them
    await _turns(2)
    assert writer.sends == 1
    assert await asyncio.wait_for(reader.readexactly(120), 5) == b"x" * 60 + b"y" * 60


async def test_drain_sends_at_once_and_close_sends_what_is_left(
    pair: tuple[asyncio.StreamWriter, asyncio.StreamReader],
) -> None:
    raw, reader = pair
    writer = CoalescingWriter(raw)
    writer.write(b"one")
    await writer.drain()
    assert writer.sends == 1
    writer.write(b"two")
    writer.close()
    assert writer.sends == 2
    assert await asyncio.wait_for(reader.read(), 5) == b"onetwo"


async def test_max_delay_bounds_how_long_a_write_waits(
    pair: tuple[asyncio.StreamWriter, asyncio.StreamReader],
) -> None:
    raw, reader = pair
    writer = CoalescingWriter(raw, max_turns=10_000, max_delay_s=0.02)
    loop = asyncio.get_running_loop()
    started = loop.time()
    while writer.sends == 0:  # a write every turn: only the delay bound can end the wait
        assert loop.time() - started < 5, "never sent"
        writer.write(b"z")
        await asyncio.sleep(0)
    assert loop.time() - started >= 0.02
    assert writer.writes > 1
    writer.flush()
    assert await asyncio.wait_for(reader.readexactly(writer.writes), 5) == b"z" * writer.writes
