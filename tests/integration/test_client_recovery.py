"""The client after faults on the real broker: a channel error (the jobs exchange deleted, an
error on its channel) never breaks it for good, a job the broker had not confirmed when the
connection dropped is answered rather than reported lost, a stream never iterated holds
nothing, a stream whose job restarts on another worker is never spliced, and only a job's own
producer can cancel it."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest

import modelfleet.client as client_module
from modelfleet.cancel import cancel_body
from modelfleet.client import Client
from modelfleet.config import Settings
from modelfleet.errors import (
    ConnectionLostError,
    JobCancelledError,
    NoWorkerError,
    StreamRestartedError,
)
from modelfleet.jobs import Job
from modelfleet.topology import Topology, json_message
from modelfleet.worker import Handler, Worker
from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.integration.support import Holding, broker, ready_count


def _rabbitmqctl() -> str:
    path = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    if not os.path.exists(path):
        pytest.fail("these tests close connections with rabbitmqctl; install rabbitmq-server")
    return path


def _connection_pids(name: str) -> list[str]:
    """The broker's pids of the connections named ``name`` (AMQP client property)."""
    listing = subprocess.run(
        [_rabbitmqctl(), "list_connections", "pid", "client_properties", "-q"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return [line.split("\t")[0] for line in listing.splitlines() if f'"{name}"' in line]


def close_connection(name: str) -> str:
    """Close, from the broker's side, the one connection named ``name``; returns its pid."""
    pids = _connection_pids(name)
    assert len(pids) == 1, f"expected one connection named {name}, found {pids}"
    subprocess.run(
        [_rabbitmqctl(), "close_connection", pids[0], "test: connection lost"],
        check=True,
        timeout=30,
    )
    return pids[0]


def named(ns: Namespace, role: str, **overrides: Any) -> tuple[Settings, str]:
    """Settings whose connection carries a name of its own, so a test can close just it."""
    name = f"mft-{role}-{uuid.uuid4().hex[:8]}"
    separator = "&" if "?" in ns.amqp_url else "?"
    url = f"{ns.amqp_url}{separator}name={name}"
    return ns.settings(amqp={"url": url}, **overrides), name


async def echo(job: Job) -> Any:
    await asyncio.sleep(job.payload.get("sleep", 0) if isinstance(job.payload, dict) else 0)
    return job.payload


def worker(handler: Handler, model: str, settings: Settings, worker_id: str) -> Worker:
    return Worker(
        handler,
        [model],
        settings=settings,
        worker_id=worker_id,
        concurrency=4,
        install_signal_handlers=False,
    )


# -- item 1: a channel-level error ---------------------------------------------------------------


async def test_a_deleted_jobs_exchange_fails_jobs_fast_then_the_same_client_serves_again(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    settings = ns.settings()
    topology = Topology(ns.names, settings.routing, settings.heartbeat)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(worker(echo, model, settings, "w1"))
        client = await stack.enter_async_context(Client(settings))
        connection = await stack.enter_async_context(broker(amqp_url))
        channel = await connection.channel()
        await topology.bind_model(channel, model)  # what a controller does for a live model
        assert await client.submit(model, {"n": 1}, timeout=5) == {"n": 1}

        await channel.exchange_delete(ns.names.jobs)
        for n in (2, 3):  # each time: at once, and named for its cause
            began = time.monotonic()
            with pytest.raises(NoWorkerError) as info:
                await client.submit(model, {"n": n}, timeout=4)
            assert time.monotonic() - began < 2
            assert repr(ns.names.jobs) in info.value.message
            assert info.value.model == model

        await topology.declare_base(channel)
        await topology.bind_model(channel, model)
        restored = time.monotonic()
        assert await client.submit(model, {"n": 4}, timeout=5) == {"n": 4}
        assert time.monotonic() - restored < 5
        assert client.pending == 0


async def test_any_error_that_closes_the_clients_channel_is_recovered(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    settings = ns.settings(worker={"stop_grace_s": 0.5})  # the 30 s job is cut short at the end
    async with AsyncExitStack() as stack:
        active = await stack.enter_async_context(worker(echo, model, settings, "w1"))
        client = await stack.enter_async_context(Client(settings))
        connection = await stack.enter_async_context(broker(amqp_url))
        await Topology(ns.names).bind_model(await connection.channel(), model)
        assert await client.submit(model, {"n": 1}, timeout=5) == {"n": 1}
        running = asyncio.create_task(client.submit(model, {"n": 2, "sleep": 30}, timeout=60))
        await wait_for(lambda: active.in_flight == 1, what="the job running")
        # The broker confirms a queue's messages in order: once a later job is answered, the
        # running one's publish is confirmed too.
        assert await client.submit(model, {"n": 5}, timeout=5) == {"n": 5}

        # Fault injection below aio-pika's API: a frame the broker answers by closing this
        # channel (PRECONDITION_FAILED - unknown delivery tag), not the connection.
        assert client._channel is not None
        underlay = await client._channel.get_underlay_channel()
        await underlay.basic_ack(delivery_tag=424242)

        # The job it had sent cannot be answered any more (its reply path was that channel):
        # it fails at once, not at its 60 s deadline...
        began = time.monotonic()
        with pytest.raises(ConnectionLostError):
            await running
        assert time.monotonic() - began < 5
        # ...and the same client serves again within seconds.
        assert await client.submit(model, {"n": 3}, timeout=5) == {"n": 3}
        assert client.pending == 0


# -- item 5: jobs not yet confirmed when the connection dropped -----------------------------------


async def test_a_job_not_yet_confirmed_when_the_connection_drops_is_answered(
    ns: Namespace, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ns.model()
    settings, name = named(ns, "client")
    # Hold the job's publish (our own function, the broker stays real) so that the connection
    # drops while the job is pending and not confirmed, then let it go.
    real_publish = client_module.publish_on
    entered, release = asyncio.Event(), asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> None:
        entered.set()
        await release.wait()
        await real_publish(*args, **kwargs)

    async with AsyncExitStack() as stack:
        await stack.enter_async_context(worker(echo, model, ns.settings(), "w1"))
        client = await stack.enter_async_context(Client(settings))
        connection = await stack.enter_async_context(broker(amqp_url))
        await Topology(ns.names).bind_model(await connection.channel(), model)
        assert await client.submit(model, {"n": 1}, timeout=5) == {"n": 1}

        monkeypatch.setattr(client_module, "publish_on", held)
        job = asyncio.create_task(client.submit(model, {"n": 2}, timeout=20))
        await asyncio.wait_for(entered.wait(), 5)
        old = await asyncio.to_thread(close_connection, name)

        async def reconnected() -> bool:
            pids = await asyncio.to_thread(_connection_pids, name)
            return bool(pids) and old not in pids

        await wait_for(reconnected, timeout=15, interval=0.2, what="the client reconnected")
        release.set()
        assert await job == {"n": 2}
        assert client.pending == 0


# -- item 8: a stream never iterated ---------------------------------------------------------


async def test_a_stream_never_iterated_holds_nothing_and_sends_nothing(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    settings = ns.settings()
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(worker(echo, model, settings, "w1"))
        client = await stack.enter_async_context(Client(settings))
        connection = await stack.enter_async_context(broker(amqp_url))
        await Topology(ns.names).bind_model(await connection.channel(), model)
        stream = client.stream(model, {"n": 1})
        assert stream.job_id
        del stream
        gc.collect()
        assert client.pending == 0
        async with client.stream(model, {"n": 2}):
            pass  # entered and left without iterating
        assert client.pending == 0
        assert await ready_count(connection, ns.names.model_queue(model)) == 0
        assert await client.submit(model, {"n": 3}, timeout=5) == {"n": 3}
        assert client.pending == 0


# -- item 4: a stream restarted on another worker --------------------------------------------


class Restarting:
    """A stream handler: its first delivery sends two chunks and hangs (its worker is then cut
    off); a redelivery streams other chunks slowly, recording whether it was cancelled."""

    def __init__(self) -> None:
        self.hang = asyncio.Event()
        self.attempts: list[int] = []
        self.cancelled: list[int] = []

    async def __call__(self, job: Job) -> AsyncIterator[Any]:
        self.attempts.append(job.attempt)
        if job.attempt == 1:
            yield {"text": "a0"}
            yield {"text": "a1"}
            await self.hang.wait()
            return
        try:
            for index in range(100):
                yield {"text": f"b{index}"}
                await asyncio.sleep(0.1)
        except asyncio.CancelledError:
            self.cancelled.append(job.attempt)
            raise


async def test_a_stream_restarted_on_another_worker_ends_with_stream_restarted(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    handler = Restarting()
    first_settings, first_name = named(ns, "worker-a")
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(worker(handler, model, first_settings, "a"))
        stack.callback(handler.hang.set)  # let the first attempt end before its worker stops
        client = await stack.enter_async_context(Client(ns.settings()))
        connection = await stack.enter_async_context(broker(amqp_url))
        await Topology(ns.names).bind_model(await connection.channel(), model)

        received: list[Any] = []
        stream = client.stream(model, {"prompt": "x"}, timeout=20)
        chunks = aiter(stream)
        received.append(await anext(chunks))
        received.append(await anext(chunks))
        # Worker B is idle when A's connection dies: the broker hands it the job again.
        await stack.enter_async_context(worker(handler, model, ns.settings(), "b"))
        await asyncio.to_thread(close_connection, first_name)
        with pytest.raises(StreamRestartedError) as info:
            async for chunk in chunks:
                received.append(chunk)
        assert received == [{"text": "a0"}, {"text": "a1"}]  # never a chunk of the new attempt
        assert info.value.code == 50009 and info.value.job_id == stream.job_id
        assert any(attempt > 1 for attempt in handler.attempts)
        # The new attempt does not run on for nobody: it is cancelled on its worker.
        await wait_for(lambda: handler.cancelled != [], timeout=5, what="the new attempt cancelled")
        assert client.pending == 0


# -- item 7: only a job's producer can cancel it ------------------------------------------------


async def test_only_the_producer_of_a_job_can_cancel_it(ns: Namespace, amqp_url: str) -> None:
    model = ns.model()
    handler = Holding(wrap=True)
    settings = ns.settings()
    async with AsyncExitStack() as stack:
        running = await stack.enter_async_context(worker(handler, model, settings, "w1"))
        owner = await stack.enter_async_context(Client(settings))
        other = await stack.enter_async_context(Client(settings))
        connection = await stack.enter_async_context(broker(amqp_url))
        channel = await connection.channel()
        await Topology(ns.names).bind_model(channel, model)
        await wait_for(lambda: running.cancels.listening, what="the worker's control queue")

        job = asyncio.create_task(owner.submit(model, "first", timeout=20))
        await wait_for(lambda: len(handler.started) == 1, timeout=5, what="the job running")
        job_id = handler.started[0]

        # Another producer: through its Client (which has no key for it, so sends nothing), and
        # by hand with a made-up key and with none.
        await other.cancel(job_id)
        control = await channel.get_exchange(ns.names.control)
        forged = cancel_body(job_id, time.time() + 60, key="0" * 32)
        await control.publish(json_message(forged, type="cancel"), routing_key="")
        await control.publish(json_message(cancel_body(job_id), type="cancel"), routing_key="")
        await wait_for(lambda: running.cancels.refused >= 2, timeout=5, what="2 cancels refused")
        assert handler.cancelled == []
        handler.release.set()
        assert await job == {"done": "first"}  # it ran to its end

        # The owner's cancel still works, on a running job...
        handler.release.clear()
        second = asyncio.create_task(owner.submit(model, "second", timeout=20))
        await wait_for(lambda: len(handler.started) == 2, timeout=5, what="the second job")
        await owner.cancel(handler.started[1])
        with pytest.raises(JobCancelledError):
            await second
        await wait_for(lambda: handler.cancelled == [handler.started[1]], timeout=5, what="stop")
        assert handler.finished == [job_id]


async def test_cancels_reach_the_worker_again_after_the_control_exchange_comes_back(
    ns: Namespace, amqp_url: str
) -> None:
    """Bindings die with their exchange: {ns}.control deleted and declared again leaves every
    worker's control queue unbound, and cancels would be dropped without a word. The worker
    binds it again within REBIND_CONTROL_EVERY heartbeat intervals."""
    model = ns.model()
    handler = Holding(wrap=True)
    settings = ns.settings(heartbeat={"interval_s": 0.2, "timeout_s": 1.0})
    async with AsyncExitStack() as stack:
        running = await stack.enter_async_context(worker(handler, model, settings, "w1"))
        owner = await stack.enter_async_context(Client(settings))
        connection = await stack.enter_async_context(broker(amqp_url))
        channel = await connection.channel()
        await Topology(ns.names).bind_model(channel, model)
        await wait_for(lambda: running.cancels.listening, what="the worker's control queue")
        await channel.exchange_delete(ns.names.control)
        control = await Topology(ns.names).declare_control(channel)

        # A forged cancel is counted as refused once it arrives: proof the binding is back.
        forged = cancel_body("f" * 32, time.time() + 60, key="0" * 32)

        async def bound_again() -> bool:
            await control.publish(json_message(forged, type="cancel"), routing_key="")
            await asyncio.sleep(0.1)
            return running.cancels.refused > 0

        await wait_for(bound_again, timeout=10, what="the control queue bound again")
        job = asyncio.create_task(owner.submit(model, "late", timeout=20))
        await wait_for(lambda: len(handler.started) == 1, timeout=5, what="the job running")
        await owner.cancel(handler.started[0])
        with pytest.raises(JobCancelledError):
            await job
        await wait_for(lambda: handler.cancelled == handler.started, timeout=5, what="stop")
