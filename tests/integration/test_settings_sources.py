"""``Client()`` and ``Worker()`` read the settings the commands read (issue 11): the
``MODELFLEET_*`` environment and the settings file, unless given explicit values."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfleet import Client, Worker
from modelfleet.controller import Controller
from modelfleet.handlers import echo
from tests.conftest import Namespace
from tests.integration.support import wait_routable


@pytest.fixture
def env_of(ns: Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's namespace and broker, in the environment only."""
    for key, value in ns.env().items():
        monkeypatch.setenv(key, value)


@pytest.mark.usefixtures("env_of")
async def test_client_and_worker_without_settings_read_the_environment(ns: Namespace) -> None:
    model = ns.model()
    client, worker = Client(), Worker(echo, [model], install_signal_handlers=False)
    assert client.names.ns == ns.name and worker.names.ns == ns.name
    assert client.settings.heartbeat.interval_s == 0.25  # MODELFLEET_HEARTBEAT__INTERVAL
    async with Controller(ns.settings()) as controller, worker, client:
        await wait_routable(controller, model)
        assert await client.submit(model, {"from": "env"}) == {"from": "env"}


async def test_a_settings_file_is_read_and_explicit_values_win(
    ns: Namespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "settings.toml"
    config.write_text(
        f'namespace = "{ns.name}"\n[amqp]\nurl = "{ns.amqp_url}"\n[client]\ntimeout_s = 7\n'
    )
    monkeypatch.setenv("MODELFLEET_CONFIG", str(config))
    monkeypatch.delenv("MODELFLEET_NAMESPACE", raising=False)
    client = Client()
    assert client.names.ns == ns.name and client.timeout == 7
    explicit = Client(namespace="elsewhere", timeout=3)
    assert explicit.names.ns == "elsewhere" and explicit.timeout == 3
    monkeypatch.setenv("MODELFLEET_NAMESPACE", "from-env")
    assert Client().names.ns == "from-env"  # the environment wins over the file, as for commands
