"""The client under faults found in review of its recovery, each on the real broker: a channel
error under load must not take the connection with it, a publish the broker refuses fails at
once, a job reported CONNECTION_LOST is cancelled on the workers, a channel left closed while
the connection is up is reopened, a closed client fails at once, and a flood of forged cancels
cannot stop a job's owner from cancelling it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections import Counter
from contextlib import AsyncExitStack
from typing import Any

import pytest

from modelfleet.cancel import cancel_body
from modelfleet.client import Client
from modelfleet.config import Settings
from modelfleet.controller import Controller
from modelfleet.errors import BrokerError, ConnectionLostError, JobCancelledError
from modelfleet.jobs import Job
from modelfleet.topology import Topology, json_message
from modelfleet.worker import Handler, Worker
from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.integration.support import Holding, broker, ready_count, wait_routable


def _rabbitmqctl() -> str:
    path = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    if not os.path.exists(path):
        pytest.fail("these tests use rabbitmqctl on the test broker's host; install it")
    return path


def _ctl(*args: str) -> str:
    return subprocess.run(
        [_rabbitmqctl(), *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def _connection_pids(name: str) -> list[str]:
    """The broker's pids of the connections named ``name`` (AMQP client property)."""
    listing = _ctl("list_connections", "pid", "client_properties", "-q")
    return [line.split("\t")[0] for line in listing.splitlines() if f'"{name}"' in line]


def _named(ns: Namespace, **overrides: Any) -> tuple[Settings, str]:
    name = f"mft-client-{uuid.uuid4().hex[:8]}"
    separator = "&" if "?" in ns.amqp_url else "?"
    return ns.settings(amqp={"url": f"{ns.amqp_url}{separator}name={name}"}, **overrides), name


async def echo(job: Job) -> Any:
    return job.payload


def worker(handler: Handler, model: str, settings: Settings, concurrency: int = 4) -> Worker:
    return Worker(
        handler,
        [model],
        settings=settings,
        worker_id="w1",
        concurrency=concurrency,
        install_signal_handlers=False,
    )


async def _break_channel(client: Client, ns: Namespace) -> None:
    """Fault injection below aio-pika's API: a publish to a missing exchange on the client's
    channel, which the broker answers by closing that channel (not the connection)."""
    assert client._channel is not None
    underlay = await client._channel.get_underlay_channel()
    with pytest.raises(Exception, match="NOT_FOUND"):
        await underlay.basic_publish(b"x", exchange=f"{ns.name}.missing", routing_key="x")


async def test_a_channel_error_under_load_never_closes_the_connection(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    settings, name = _named(ns)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(worker(echo, model, ns.settings(), concurrency=64))
        client = await stack.enter_async_context(Client(settings))
        connection = await stack.enter_async_context(broker(amqp_url))
        await Topology(ns.names).bind_model(await connection.channel(), model)
        assert await client.submit(model, 0, timeout=5) == 0
        [pid] = await asyncio.to_thread(_connection_pids, name)

        outcomes: Counter[str] = Counter()

        async def one(index: int) -> None:
            try:
                await client.submit(model, index, timeout=6)
                outcomes["ok"] += 1
            except ConnectionLostError:  # confirmed on the channel that closed: expected
                outcomes["lost"] += 1
            except Exception as exc:
                outcomes[type(exc).__name__] += 1

        jobs: list[asyncio.Task[None]] = []
        stop = asyncio.Event()

        async def feed() -> None:  # publishes in flight on every loop turn
            index = 0
            while not stop.is_set():
                jobs.append(asyncio.create_task(one(index)))
                index += 1
                await asyncio.sleep(0)

        feeder = asyncio.create_task(feed())
        await wait_for(lambda: len(jobs) >= 300, what="jobs in flight")
        await _break_channel(client, ns)
        await wait_for(lambda: len(jobs) >= 600, what="more jobs after the channel error")
        stop.set()
        await feeder
        await asyncio.gather(*jobs)

        # The broker never closed the connection (a frame after the channel's CloseOk would
        # have: 504 CHANNEL_ERROR), and every job was answered or reported lost at once.
        assert await asyncio.to_thread(_connection_pids, name) == [pid]
        assert set(outcomes) <= {"ok", "lost"}, outcomes
        assert outcomes["ok"] > 0
        assert await client.submit(model, "after", timeout=5) == "after"


async def test_a_publish_the_broker_refuses_fails_at_once_and_is_not_retried(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    user, password = f"mft-refused-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    escaped = ns.name.replace("-", r"\-")
    async with AsyncExitStack() as stack:
        connection = await stack.enter_async_context(broker(amqp_url))
        topology = Topology(ns.names, ns.settings().routing, ns.settings().heartbeat)
        channel = await connection.channel()
        await topology.declare_jobs(channel)
        await topology.declare_model_queue(channel, model)
        await topology.bind_model(channel, model)
        await asyncio.to_thread(_ctl, "add_user", user, password)
        stack.push_async_callback(asyncio.to_thread, _ctl, "delete_user", user)
        # May read its replies and see the namespace, may write nothing: not its jobs.
        await asyncio.to_thread(
            _ctl,
            "set_permissions",
            "-p",
            "/",
            user,
            f"^{escaped}.*",
            "^$",
            rf"^({escaped}.*|amq\.rabbitmq\.reply-to.*)$",
        )
        url = amqp_url.replace("guest:guest@", f"{user}:{password}@")
        assert url != amqp_url
        # Bound by hand, no controller: the publish itself must be what fails.
        client = await stack.enter_async_context(
            Client(ns.settings(amqp={"url": url}, client={"fail_fast_without_controller": False}))
        )
        assert client._channel is not None
        closes: list[object] = []
        client._channel.close_callbacks.add(lambda *args: closes.append(args))

        for attempt in range(2):
            began = time.monotonic()
            with pytest.raises(BrokerError) as info:
                await client.submit(model, {"n": attempt}, timeout=5)
            assert time.monotonic() - began < 1.0
            assert repr(ns.names.jobs) in str(info.value)
            assert user in str(info.value)  # the broker's text names the user refused
        assert len(closes) <= 2  # once per job, not once per 100 ms retry


async def test_a_job_reported_connection_lost_is_cancelled_on_the_workers(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    handler = Holding()
    settings = ns.settings(worker={"stop_grace_s": 0.5})
    async with AsyncExitStack() as stack:
        running = await stack.enter_async_context(worker(handler, model, settings))
        client = await stack.enter_async_context(Client(settings))
        connection = await stack.enter_async_context(broker(amqp_url))
        await Topology(ns.names).bind_model(await connection.channel(), model)
        await wait_for(lambda: running.cancels.listening, what="the worker's control queue")
        job = asyncio.create_task(client.submit(model, "held", timeout=30))
        await wait_for(lambda: len(handler.started) == 1, what="the job running")

        await _break_channel(client, ns)
        with pytest.raises(ConnectionLostError) as info:
            await job
        # The connection is still up: the cancel reaches the worker, which stops the handler
        # instead of running a job whose answer nobody can read.
        await wait_for(lambda: handler.cancelled == handler.started, timeout=5, what="cancel")
        assert "cancelled" in info.value.message


async def test_a_channel_left_closed_with_the_connection_up_is_reopened(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    settings = ns.settings()
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(worker(echo, model, settings))
        client = await stack.enter_async_context(Client(settings))
        connection = await stack.enter_async_context(broker(amqp_url))
        await Topology(ns.names).bind_model(await connection.channel(), model)
        assert await client.submit(model, 1, timeout=5) == 1

        # What a failed reopen leaves behind (aio-pika only logs it): the robust channel closed
        # for good while the connection is fine. Closing it is the one way to get there at
        # will; aio-pika does not reopen a channel closed this way either.
        assert client._channel is not None
        await client._channel.close()
        assert not client.ready

        began = time.monotonic()
        assert await client.submit(model, 2, timeout=10) == 2
        # reconnect_interval_s (1 s) + the watchdog's 2 s grace, and some slack.
        assert time.monotonic() - began < 6
        assert client.ready


async def test_a_closed_client_fails_at_once(ns: Namespace) -> None:
    model = ns.model()
    # No controller: the job must wait for the channel, not fail at once with NO_WORKER.
    settings = ns.settings(client={"fail_fast_without_controller": False})
    client = Client(settings)
    await client.connect()
    # A submit waiting for the channel while the client closes...
    assert client._channel is not None
    await client._channel.close()
    waiting = asyncio.create_task(client.submit(model, 1, timeout=10))
    await wait_for(lambda: client.pending == 1, what="the job waiting for the channel")
    began = time.monotonic()
    await client.close()
    with pytest.raises(BrokerError, match="closed"):
        await waiting
    # ...and one after it: each fails at once, named for its cause.
    with pytest.raises(BrokerError, match="closed"):
        await client.submit(model, 2, timeout=10)
    assert time.monotonic() - began < 2


async def test_a_flood_of_forged_cancels_does_not_stop_the_owners_cancel(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    handler = Holding()
    settings = ns.settings()
    async with AsyncExitStack() as stack:
        running = await stack.enter_async_context(worker(handler, model, settings, concurrency=1))
        owner = await stack.enter_async_context(Client(settings))
        connection = await stack.enter_async_context(broker(amqp_url))
        channel = await connection.channel()
        await Topology(ns.names).bind_model(channel, model)
        await wait_for(lambda: running.cancels.listening, what="the worker's control queue")

        first = asyncio.create_task(owner.submit(model, "first", timeout=20))
        await wait_for(lambda: len(handler.started) == 1, what="the first job running")
        queued = owner.stream(model, "queued", timeout=20)  # waits behind the first
        chunks = asyncio.create_task(queued.collect())
        await wait_for(lambda: owner.pending == 2, what="the second job sent")
        await wait_for(
            lambda: ready_count(connection, ns.names.model_queue(model)),
            what="the second job queued",
        )

        # The owner cancels it, then a forger who knows its id floods cancels with made-up keys.
        await owner.cancel(queued.job_id)
        with pytest.raises(JobCancelledError):
            await chunks
        await wait_for(
            lambda: running.cancels.is_cancelled(queued.job_id), what="the owner's cancel"
        )
        control = await channel.get_exchange(ns.names.control)
        for n in range(20):
            forged = cancel_body(queued.job_id, time.time() + 60, key=f"{n:032x}")
            await control.publish(json_message(forged, type="cancel"), routing_key="")
        control_queue = ns.names.control_queue(running.cancels.instance)
        await wait_for(
            lambda: _consumed(connection, control_queue), what="the forged cancels consumed"
        )

        handler.release.set()
        assert await first == "first"
        # The worker takes the queued job next and skips it: the owner's cancel held.
        assert await owner.submit(model, "third", timeout=10) == "third"
        assert queued.job_id not in handler.started


async def _consumed(connection: Any, queue: str) -> bool:
    return await ready_count(connection, queue) == 0


async def test_closing_a_client_cancels_its_unanswered_jobs_on_the_workers(
    ns: Namespace,
) -> None:
    model = ns.model()
    handler = Holding()
    settings = ns.settings()
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        await stack.enter_async_context(worker(handler, model, settings))
        await wait_routable(controller, model)
        client = Client(settings)
        await client.connect()
        waiting = asyncio.create_task(client.submit(model, "held", timeout=30))
        await wait_for(lambda: len(handler.started) == 1, what="the job running")
        await client.close()
        with pytest.raises(BrokerError, match="closed"):
            await waiting
        # Nobody can read its answer any more: its handler is stopped, not left to its deadline.
        await wait_for(lambda: handler.cancelled == handler.started, what="the handler cancelled")
