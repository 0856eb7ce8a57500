"""The gateway is safe to expose (issue 12): request heads and bodies have a deadline
(``gateway.read_timeout_s``), connections beyond ``gateway.max_connections`` get 503, and
listening beyond loopback without API keys is refused unless ``gateway.allow_unauthenticated``
says so (then a WARNING). Raw sockets against a real gateway on the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from modelfleet.errors import ConfigError
from modelfleet.gateway import Gateway, exposure_error, is_exposed
from tests.conftest import Namespace
from tests.gateway.support import gateway_settings

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def gateway(ns: Namespace, **options: Any) -> AsyncIterator[Gateway]:
    async with Gateway(gateway_settings(ns, gateway=options)) as served:
        yield served


@asynccontextmanager
async def connection(served: Gateway) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def closed_within(reader: asyncio.StreamReader, bound: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took;
    fails when it is still open after ``bound`` seconds."""
    started = time.monotonic()
    received = bytearray()
    try:
        async with asyncio.timeout(bound):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        pytest.fail(f"the connection was still open after {bound}s (got {bytes(received)!r})")
    except ConnectionResetError:
        pass
    return bytes(received), time.monotonic() - started


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length, leaving the connection open."""
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


def status_of(raw: bytes) -> int:
    return int(raw.split(b"\r\n", 1)[0].split()[1])


GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"


# -- header and body read timeouts ------------------------------------------------------------


async def test_a_silent_connection_is_closed_within_the_read_timeout(ns: Namespace) -> None:
    async with gateway(ns, read_timeout_s=1.0) as served, connection(served) as (reader, _):
        received, took = await closed_within(reader, 5.0)
    assert received == b""
    assert 0.8 <= took < 5.0


async def test_a_partial_request_head_is_closed_within_the_read_timeout(ns: Namespace) -> None:
    async with gateway(ns, read_timeout_s=1.0) as served, connection(served) as (reader, writer):
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Le")
        await writer.drain()
        received, took = await closed_within(reader, 5.0)
    assert received == b""
    assert 0.8 <= took < 5.0


async def test_the_next_head_on_a_kept_alive_connection_has_the_deadline_too(
    ns: Namespace,
) -> None:
    """uvicorn's keep-alive timer stops at the first byte of the next request: a client could
    then hold the connection with half a head. The head deadline is re-armed after each answer."""
    async with gateway(ns, read_timeout_s=1.0) as served, connection(served) as (reader, writer):
        writer.write(GET_HEALTHZ)
        await writer.drain()
        status, _, _ = await response(reader)
        assert status == 200
        writer.write(b"GET /healthz HTTP/1.1\r\nHo")
        await writer.drain()
        received, took = await closed_within(reader, 5.0)
    assert received == b""
    assert took < 5.0


async def test_a_body_slower_than_the_read_timeout_gets_408_and_is_closed(ns: Namespace) -> None:
    """A byte every 0.1 s keeps each read short: the deadline is the whole body's."""
    async with gateway(ns, read_timeout_s=1.0) as served, connection(served) as (reader, writer):
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        await writer.drain()

        async def trickle() -> None:
            with contextlib.suppress(OSError):  # the gateway closes the connection
                for _ in range(200):
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(0.1)

        trickling = asyncio.create_task(trickle())
        try:
            received, took = await closed_within(reader, 5.0)
        finally:
            trickling.cancel()
            await asyncio.wait({trickling})
    assert status_of(received) == 408, received
    assert b"connection: close" in received.lower()
    assert b"gateway.read_timeout_s" in received
    assert 0.8 <= took < 5.0


async def test_a_body_within_the_read_timeout_is_served(ns: Namespace) -> None:
    async with gateway(ns, read_timeout_s=2.0) as served, connection(served) as (reader, writer):
        body = b'{"model": "m"}'  # no messages: 400 from validation, after the whole body
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        await writer.drain()
        await asyncio.sleep(0.3)  # a pause shorter than the deadline: not a wait for anything
        writer.write(body)
        await writer.drain()
        status, _, answer = await response(reader)
    assert status == 400, answer
    assert b"messages" in answer


# -- the connection limit ----------------------------------------------------------------------


async def test_a_request_beyond_max_connections_gets_503(ns: Namespace) -> None:
    async with (
        gateway(ns, max_connections=2, read_timeout_s=10.0) as served,
        connection(served) as first,
        connection(served) as second,
    ):
        for reader, writer in (first, second):
            writer.write(GET_HEALTHZ)
            await writer.drain()
            status, _, _ = await response(reader)
            assert status == 200  # both served, and kept open

        async with connection(served) as (reader, writer):
            writer.write(GET_HEALTHZ)
            await writer.drain()
            received, _ = await closed_within(reader, 5.0)
        assert status_of(received) == 503, received

        # One beyond the limit that sends nothing is dropped within a second, not read_timeout_s.
        async with connection(served) as (reader, _):
            received, took = await closed_within(reader, 5.0)
        assert received == b""
        assert took < 5.0

        # Below the limit again: served.
        first[1].close()

        async def served_again() -> int:
            async with connection(served) as (reader, writer):
                writer.write(GET_HEALTHZ)
                await writer.drain()
                status, _, _ = await response(reader)
                return status

        deadline = time.monotonic() + 10
        while (status := await served_again()) != 200:
            assert status == 503
            assert time.monotonic() < deadline, "still 503 after a connection closed"
            await asyncio.sleep(0.05)


# -- listening beyond loopback without keys ----------------------------------------------------


def test_which_hosts_are_exposed() -> None:
    for host in ("", "0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "gateway.example.com"):
        assert is_exposed(host), host
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert not is_exposed(host), host


async def test_all_interfaces_without_keys_is_refused(ns: Namespace) -> None:
    served = Gateway(gateway_settings(ns), host="0.0.0.0")
    with pytest.raises(ConfigError) as info:
        await served.start()
    assert str(info.value) == exposure_error("0.0.0.0")
    assert "\n" not in str(info.value)
    assert "gateway.allow_unauthenticated" in str(info.value)
    assert not served.client.ready


async def test_all_interfaces_without_keys_with_the_opt_in_warns(
    ns: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    settings = gateway_settings(ns, gateway={"allow_unauthenticated": True})
    with caplog.at_level(logging.WARNING, logger="modelfleet.gateway"):
        async with Gateway(settings, host="0.0.0.0") as served:
            assert served.client.ready
            async with connection(served) as (reader, writer):
                writer.write(GET_HEALTHZ)
                await writer.drain()
                status, _, _ = await response(reader)
            assert status == 200
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("WITHOUT API keys" in r.getMessage() for r in warnings), caplog.text


async def test_all_interfaces_with_keys_starts_without_a_warning(
    ns: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    settings = gateway_settings(ns, gateway={"api_keys": ["k-1"]})
    with caplog.at_level(logging.WARNING, logger="modelfleet.gateway"):
        async with Gateway(settings, host="0.0.0.0") as served:
            assert served.client.ready
    assert not any("WITHOUT API keys" in r.getMessage() for r in caplog.records)
