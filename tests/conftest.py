"""Shared fixtures: a real RabbitMQ, a random namespace per test, everything deleted after.

The broker is ``$MODELFLEET_TEST_AMQP_URL``, else the local 127.0.0.1:5672 when it answers, else
a testcontainers RabbitMQ when a Docker engine runs; otherwise the test fails (never skips) with a
message saying how to provide one.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest

from modelfleet.config import Settings, settings_from_mapping
from modelfleet.topology import Names, Topology

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 5672), timeout=2
        ):
            return True
    except OSError:
        return False


def _docker_running() -> bool:
    return os.path.exists("/var/run/docker.sock") or bool(os.environ.get("DOCKER_HOST"))


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    explicit = os.environ.get("MODELFLEET_TEST_AMQP_URL")
    if explicit:
        if not _answers(explicit):
            pytest.fail(f"MODELFLEET_TEST_AMQP_URL={explicit} does not answer")
        yield explicit
        return
    if _answers(LOCAL_URL):
        yield LOCAL_URL
        return
    if _docker_running():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-management") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/"
        return
    pytest.fail(
        "no RabbitMQ for the tests: set MODELFLEET_TEST_AMQP_URL, start one on 127.0.0.1:5672 "
        "(`rabbitmq-server -detached`), or run a Docker engine for testcontainers"
    )


class Namespace:
    """A random namespace; remembers models so teardown can delete their queues."""

    def __init__(self, amqp_url: str) -> None:
        self.name = f"mft-{uuid.uuid4().hex[:10]}"
        self.amqp_url = amqp_url
        self.models: set[str] = set()
        self.names = Names(self.name)

    def model(self, prefix: str = "m") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.models.add(name)
        return name

    def settings(self, **overrides: Any) -> Settings:
        """Fast settings for tests: 0.25 s heartbeats, 1 s timeout, 0.5 s grace."""
        data: dict[str, Any] = {
            "namespace": self.name,
            "amqp": {"url": self.amqp_url, "heartbeat_s": 5},
            "heartbeat": {"interval_s": 0.25, "timeout_s": 1.0, "sweep_interval_s": 0.1},
            "routing": {"no_worker_grace_s": 0.5, "stats_interval_s": 0.5},
            "worker": {"stop_grace_s": 5},
            "client": {"timeout_s": 10},
            "http": {"port": 0},
        }
        for key, value in overrides.items():
            if isinstance(value, dict):
                data.setdefault(key, {}).update(value)
            else:
                data[key] = value
        return settings_from_mapping(data)

    def env(self) -> dict[str, str]:
        """The same fast settings as environment variables, for subprocesses."""
        return {
            "MODELFLEET_NAMESPACE": self.name,
            "MODELFLEET_AMQP__URL": self.amqp_url,
            "MODELFLEET_HEARTBEAT__INTERVAL": "0.25",
            "MODELFLEET_HEARTBEAT__TIMEOUT": "1.0",
            "MODELFLEET_HEARTBEAT__SWEEP_INTERVAL_S": "0.1",
            "MODELFLEET_ROUTING__NO_WORKER_GRACE_S": "0.5",
            "MODELFLEET_ROUTING__STATS_INTERVAL_S": "0.5",
        }

    async def cleanup(self) -> None:
        connection = await aio_pika.connect(self.amqp_url)
        try:
            channel = await connection.channel()
            await Topology(self.names).delete(channel, sorted(self.models))
        finally:
            await connection.close()


@pytest.fixture
async def ns(amqp_url: str) -> AsyncIterator[Namespace]:
    namespace = Namespace(amqp_url)
    yield namespace
    await namespace.cleanup()
