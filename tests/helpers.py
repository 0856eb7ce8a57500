"""Test helpers importable from any test module (``from tests.helpers import wait_for``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest


async def wait_for(
    predicate: Any, *, timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> None:
    """Poll ``predicate`` (sync or async) until true, failing after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def broker_connections(name: str) -> int:
    """How many connections the broker lists whose AMQP client properties name ``name``
    (rabbitmqctl; the test fails if it is not installed)."""
    import os
    import shutil
    import subprocess

    rabbitmqctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    if not os.path.exists(rabbitmqctl):
        pytest.fail("this test counts broker connections with rabbitmqctl")
    listing = subprocess.run(
        [rabbitmqctl, "list_connections", "client_properties", "-q"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return sum(f'"{name}"' in line for line in listing.splitlines())
