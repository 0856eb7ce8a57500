"""Fixtures of the live observability tests: RabbitMQ's Prometheus endpoint, and a fleet of real
``modelfleet`` processes (the ``fleet`` fixture of tests/process) driven through every outcome the
dashboard shows."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

import aio_pika
import pytest

from modelfleet import Client, InvalidJobError, NoWorkerError, WorkerError
from tests.conftest import Namespace
from tests.process import conftest as process_fixtures
from tests.process.conftest import Fleet

# the `fleet` fixture of tests/process (controller/worker subprocesses), reused here
fleet = process_fixtures.fleet

RABBITMQ_METRICS_PORT = 15692


def http_get(url: str, timeout: float = 3) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


def _answers(url: str) -> bool:
    try:
        http_get(url)
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def rabbitmq_metrics_url(amqp_url: str) -> str:
    """RabbitMQ's rabbitmq_prometheus endpoint; on a local broker the plugin is enabled if needed.

    ``$MODELFLEET_TEST_RABBITMQ_METRICS_URL`` overrides the address (default: the AMQP host, port
    15692)."""
    url = os.environ.get("MODELFLEET_TEST_RABBITMQ_METRICS_URL") or (
        f"http://{urlsplit(amqp_url).hostname or '127.0.0.1'}:{RABBITMQ_METRICS_PORT}/metrics"
    )
    if _answers(url):
        return url
    host = urlsplit(url).hostname or ""
    plugins = shutil.which("rabbitmq-plugins", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if not (host.startswith("127.") or host == "localhost") or plugins is None:
        pytest.fail(
            f"RabbitMQ's Prometheus endpoint {url} does not answer; enable the plugin on the "
            "broker (`rabbitmq-plugins enable rabbitmq_prometheus`) or set "
            "MODELFLEET_TEST_RABBITMQ_METRICS_URL"
        )
    done = subprocess.run(
        [plugins, "enable", "rabbitmq_prometheus"], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        pytest.fail(
            f"`rabbitmq-plugins enable rabbitmq_prometheus` failed:\n{done.stdout}{done.stderr}"
        )
    deadline = time.monotonic() + 30
    while not _answers(url):
        if time.monotonic() > deadline:
            pytest.fail(f"rabbitmq_prometheus enabled, but {url} still does not answer after 30 s")
        time.sleep(0.5)
    return url


@dataclass(frozen=True)
class Load:
    """The models of a loaded fleet: ``model`` has two fake_llm workers and sees every outcome
    a producer can cause there; ``failing`` had a worker whose handler always raises (stopped
    cleanly afterwards: an eviction with reason ``stopping``); ``ghost`` never had a worker."""

    model: str
    failing: str
    ghost: str


PROMPT = {"prompt": "the quick brown fox jumps", "delay": 0.005}


async def submit_ok_jobs(client: Client, model: str, count: int) -> None:
    results = await asyncio.gather(
        *(client.submit(model, PROMPT, timeout=20) for _ in range(count))
    )
    assert all(r["words"] == 5 for r in results)


async def stream_one(client: Client, model: str) -> None:
    async with client.stream(model, PROMPT, timeout=20) as stream:
        chunks = [chunk async for chunk in stream]
    assert len(chunks) == 5 and stream.result["words"] == 5


async def publish_invalid_heartbeat(ns: Namespace) -> None:
    connection = await aio_pika.connect(ns.amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(ns.names.heartbeats, ensure=True)
        await exchange.publish(aio_pika.Message(b"this is not a heartbeat"), routing_key="")
    finally:
        await connection.close()


async def start_fleet_under_load(fleet: Fleet, ns: Namespace) -> Load:
    """A controller, two fake_llm workers and a failing worker, then one of everything: ok jobs, a
    streamed job, an invalid job, a NO_WORKER job, a handler error, an invalid heartbeat and a
    clean worker stop."""
    load = Load(model=ns.model("llm"), failing=ns.model("fail"), ghost=ns.model("ghost"))
    fleet.controller()
    fleet.worker(load.model)
    fleet.worker(load.model)
    failing_worker = fleet.worker(load.failing, handler="modelfleet.handlers:fail")
    await fleet.wait_routable(load.model, workers=2)
    await fleet.wait_routable(load.failing, workers=1)

    async with Client(ns.settings()) as client:
        await submit_ok_jobs(client, load.model, 40)
        await stream_one(client, load.model)
        with pytest.raises(InvalidJobError):
            await client.submit(load.model, {"no_prompt": True}, timeout=20)
        with pytest.raises(NoWorkerError):
            await client.submit(load.ghost, PROMPT, timeout=20)
        with pytest.raises(WorkerError):
            await client.submit(load.failing, PROMPT, timeout=20)
    await publish_invalid_heartbeat(ns)

    failing_worker.send_signal(signal.SIGTERM)
    await asyncio.to_thread(failing_worker.wait, 20)
    await fleet.wait(
        "/v1/workers",
        lambda d: len(d["workers"]) == 2,
        what="the failing worker to leave the registry",
    )
    return load


async def keep_loading(ns: Namespace, model: str, stop: asyncio.Event) -> int:
    """Background load until ``stop``: a few plain and streamed jobs a second. Returns jobs sent."""
    sent = 0
    async with Client(ns.settings()) as client:
        while not stop.is_set():
            await submit_ok_jobs(client, model, 3)
            await stream_one(client, model)
            sent += 4
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.25)
    return sent
