"""Starting the gateway where it cannot listen: a busy port or a host that is not this
machine's is a one-line :class:`ConfigError`, and nothing stays open (no broker connection, no
server task); the same settings on a free port then start. Real broker, connections counted
from its side."""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest

from modelfleet.config import Settings
from modelfleet.errors import ConfigError
from modelfleet.gateway import Gateway
from tests.conftest import Namespace
from tests.gateway.support import gateway_settings
from tests.helpers import broker_connections, wait_for


def named_settings(ns: Namespace) -> tuple[Settings, str]:
    """Gateway settings whose broker connection carries a name of its own."""
    name = f"mft-gateway-{uuid.uuid4().hex[:8]}"
    separator = "&" if "?" in ns.amqp_url else "?"
    return gateway_settings(ns, amqp={"url": f"{ns.amqp_url}{separator}name={name}"}), name


def gateway_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "modelfleet-gateway"]


async def test_a_busy_port_is_a_config_error_and_leaves_nothing_open(ns: Namespace) -> None:
    settings, name = named_settings(ns)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        gateway = Gateway(settings, port=port)
        with pytest.raises(ConfigError) as info:
            await gateway.start()
    assert str(info.value) == (
        f"gateway.port {port} on 127.0.0.1 is in use (another gateway?): pick another with "
        "--port or gateway.port"
    )
    assert not gateway.client.ready
    assert gateway_tasks() == []
    assert await asyncio.to_thread(broker_connections, name) == 0

    # The same settings on a free port: it starts, and the broker sees its connection (so the
    # count above could see one), which stop() closes.
    async with Gateway(settings) as served:
        assert served.client.ready
        assert await asyncio.to_thread(broker_connections, name) >= 1

    async def closed() -> bool:
        return await asyncio.to_thread(broker_connections, name) == 0

    await wait_for(closed, timeout=15, interval=0.5, what="the gateway's connection closed")


async def test_a_host_that_is_not_this_machines_is_a_config_error(ns: Namespace) -> None:
    gateway = Gateway(gateway_settings(ns), host="192.0.2.1")  # TEST-NET-1
    with pytest.raises(ConfigError, match=r"^gateway\.host 192\.0\.2\.1 cannot be bound \("):
        await gateway.start()
    assert not gateway.client.ready
    assert gateway_tasks() == []
