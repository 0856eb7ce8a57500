"""The controller recovers on its own from faults the soak did not inject (issue 10): its
heartbeat queue deleted, a channel error on its heartbeat channel, base exchanges and queues
deleted; queue depths that follow the broker; a mass death with the broker healthy; a worker
restarted under its old id. Every fault is made on the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import socket
import subprocess
import time
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
import aiohttp
import aiormq
import pytest

from modelfleet import controller as controller_module
from modelfleet.client import Client
from modelfleet.config import Settings
from modelfleet.controller import Controller
from modelfleet.errors import BrokerError, ErrorCode, NoWorkerError
from modelfleet.http import StatusServer
from modelfleet.jobs import Job
from modelfleet.messages import ErrorReply, Heartbeat
from modelfleet.service import build_controller
from modelfleet.topology import Topology
from modelfleet.worker import Worker
from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.integration.support import (
    DIRECT_REPLY_TO,
    RawProducer,
    broker,
    metric,
    queue_exists,
    ready_count,
    wait_routable,
)


async def echo(job: Job) -> Any:
    return job.payload


async def slow(job: Job) -> Any:
    await asyncio.sleep(0.3)
    return job.payload


def make_worker(settings: Settings, model: str, worker_id: str, **kw: Any) -> Worker:
    return Worker(
        kw.pop("handler", echo),
        [model],
        settings=settings,
        worker_id=worker_id,
        install_signal_handlers=False,
        **kw,
    )


async def crash(worker: Worker) -> None:
    """A crash as the broker sees it: the connection goes, no `stopping` heartbeat is sent."""
    assert worker._connection is not None
    await worker._connection.close()


async def exchange_exists(connection: aio_pika.abc.AbstractConnection, name: str) -> bool:
    channel = await connection.channel()
    try:
        await channel.declare_exchange(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    await channel.close()
    return True


def bound(source: str, destination: str) -> bool:
    """Whether the broker lists a binding from ``source`` to ``destination``."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_bindings", "source_name", "destination_name"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return any(line.split("\t") == [source, destination] for line in out.splitlines())


async def a_new_worker_registers(
    stack: AsyncExitStack, controller: Controller, settings: Settings, model: str, worker_id: str
) -> None:
    await stack.enter_async_context(make_worker(settings, model, worker_id))
    await wait_for(lambda: worker_id in controller.registry, timeout=5, what=f"{worker_id} seen")


# --- A: no zombie ------------------------------------------------------------------------------


async def announce(exchange: aio_pika.abc.AbstractExchange, worker_id: str, model: str) -> None:
    """Heartbeats of a fake worker of ``model`` every 0.2 s, until cancelled."""
    for seq in itertools.count(1):
        beat = Heartbeat(
            worker_id=worker_id, models=(model,), concurrency=1, sent_at=time.time(),
            interval_s=0.25, seq=seq,
        )  # fmt: skip
        await exchange.publish(aio_pika.Message(beat.model_dump_json().encode()), "")
        await asyncio.sleep(0.2)


async def dead_letters_counted_again(
    controller: Controller, dead: aio_pika.abc.AbstractExchange
) -> None:
    """Dead-letter through ``dead`` until the controller's tap counts one (while the tap is
    unbound or gone, its copies are lost, so one publish is not enough)."""
    labels = {"model": "other", "reason": "expired"}

    async def counted() -> bool:
        headers = {"x-mf-reason": "expired"}
        await dead.publish(aio_pika.Message(b"{}", headers=headers), routing_key="x")
        await asyncio.sleep(0.2)
        return metric(controller, "modelfleet_dead_letters_total", labels) > 0

    await wait_for(counted, timeout=10, what="dead letters counted again")


async def test_heartbeat_queue_deleted_under_the_controller_is_declared_and_consumed_again(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    settings = ns.settings()
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        await a_new_worker_registers(stack, controller, settings, model, "before")
        connection = await stack.enter_async_context(broker(amqp_url))
        channel = await connection.channel()
        await channel.queue_delete(ns.names.controller_queue(controller.instance))

        # The broker cancelled the consumer; heartbeats reach the controller again.
        await a_new_worker_registers(stack, controller, settings, model, "after")
        assert await queue_exists(connection, ns.names.controller_queue(controller.instance))
        await wait_for(lambda: controller.healthy, timeout=5, what="healthy again")


async def test_a_channel_error_on_the_heartbeat_channel_does_not_stop_heartbeats(
    ns: Namespace,
) -> None:
    model = ns.model()
    settings = ns.settings()
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        await a_new_worker_registers(stack, controller, settings, model, "before")
        # Any channel-level error closes the channel: here a passive declare of a missing queue.
        assert controller._hb_channel is not None
        underlay = await controller._hb_channel.get_underlay_channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await underlay.queue_declare(f"{ns.name}.no-such-queue", passive=True)

        await a_new_worker_registers(stack, controller, settings, model, "after")
        await wait_for(lambda: controller.healthy, timeout=5, what="healthy again")


async def test_healthz_is_503_while_the_heartbeat_consumer_is_gone(ns: Namespace) -> None:
    settings = ns.settings(routing={"startup_listen_s": 0.2})
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        server = StatusServer(controller, "127.0.0.1", 0)
        await server.start()
        stack.push_async_callback(server.stop)
        http = await stack.enter_async_context(aiohttp.ClientSession(base_url=server.url))

        async def status() -> tuple[int, dict[str, Any]]:
            async with http.get("/healthz") as response:
                return response.status, await response.json()

        async def healthy() -> bool:
            return (await status())[0] == 200

        await wait_for(healthy, timeout=5, what="healthy after start")
        assert metric(controller, "modelfleet_controller_heartbeat_consumer_up") == 1
        # Stop the keeper (so the consumer stays gone), then cancel the consumer.
        keeper = next(t for t in controller._tasks if "keeper" in t.get_name())
        keeper.cancel()
        assert controller._hb_channel is not None and controller._hb_tag is not None
        underlay = await controller._hb_channel.get_underlay_channel()
        await underlay.basic_cancel(controller._hb_tag)
        code, body = await status()
        assert code == 503
        assert body["heartbeat_consumer"] is False and body["healthy"] is False
        assert metric(controller, "modelfleet_controller_heartbeat_consumer_up") == 0


async def test_deleted_jobs_exchange_is_declared_again_and_live_models_bound_again(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    settings = ns.settings(routing={"stats_interval_s": 0.3})
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        await stack.enter_async_context(make_worker(settings, model, "w1"))
        await wait_routable(controller, model)
        connection = await stack.enter_async_context(broker(amqp_url))
        channel = await connection.channel()
        await channel.exchange_delete(ns.names.jobs)
        assert not await exchange_exists(connection, ns.names.jobs)

        # Re-declared and re-bound by the controller alone (no client declares it meanwhile).
        await wait_for(
            lambda: exchange_exists(connection, ns.names.jobs), timeout=8, what="{ns}.jobs back"
        )
        await wait_for(
            lambda: asyncio.to_thread(bound, ns.names.jobs, ns.names.model_queue(model)),
            timeout=8,
            interval=0.3,
            what="the live model bound again",
        )
        client = await stack.enter_async_context(Client(settings))
        assert await client.submit(model, {"n": 1}, timeout=5) == {"n": 1}


@pytest.mark.parametrize("fault", ["queue-deleted", "channel-error"])
async def test_the_no_worker_consumer_comes_back_after_its_queue_is_deleted_or_its_channel_fails(
    ns: Namespace, amqp_url: str, fault: str
) -> None:
    settings = ns.settings(routing={"stats_interval_s": 0.3})
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        connection = await stack.enter_async_context(broker(amqp_url))
        producer = await RawProducer.open(connection, controller.topology)
        await wait_for(lambda: not controller.listen_only, what="the end of the listen window")
        job = await producer.publish(b'{"payload": 1}', model="nobody-serves-this")
        assert isinstance(await producer.reply(job), ErrorReply)

        if fault == "queue-deleted":
            channel = await connection.channel()
            await channel.queue_delete(ns.names.unroutable)
        else:
            assert controller._nw_channel is not None
            underlay = await controller._nw_channel.get_underlay_channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await underlay.queue_declare(f"{ns.name}.no-such-queue", passive=True)
        answered: list[str] = []

        async def no_worker_again() -> bool:
            # A job published while nothing is bound to {ns}.unroutable is lost (the broker
            # drops it); keep publishing until one is answered.
            job = await producer.publish(b'{"payload": 2}', model="nobody-serves-this")
            await asyncio.sleep(0.3)
            answered.extend(j for j in producer.replies if j == job)
            return bool(answered)

        await wait_for(no_worker_again, timeout=10, what="NO_WORKER answered again")
        reply = producer.replies[answered[0]][0]
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.NO_WORKER
        assert await queue_exists(connection, ns.names.unroutable)


# --- B: queue depth follows the broker ---------------------------------------------------------


async def test_queue_depth_follows_the_broker_as_the_queue_drains(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    settings = ns.settings(routing={"stats_interval_s": 0.3})
    stats = settings.routing.stats_interval_s
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        await stack.enter_async_context(
            make_worker(settings, model, "w1", handler=slow, concurrency=1)
        )
        await wait_routable(controller, model)
        client = await stack.enter_async_context(Client(settings))
        connection = await stack.enter_async_context(broker(amqp_url))
        jobs = [asyncio.create_task(client.submit(model, {"i": i}, timeout=30)) for i in range(20)]
        try:

            def depth() -> int | None:
                row = next(m for m in controller.models_status() if m["name"] == model)
                return row["queue_depth"]  # type: ignore[no-any-return]

            await wait_for(lambda: (depth() or 0) >= 12, timeout=5, what="the backlog counted")
            first = depth()
            assert first is not None
            # The worker takes one job every 0.3 s: within two stats intervals and a few jobs,
            # the reported depth must have gone down with the broker's.
            await wait_for(
                lambda: (depth() or first) <= first - 3,
                timeout=2 * stats + 4 * 0.3 + 1.0,
                what=f"queue_depth below {first - 3}",
            )
            broker_depth = await ready_count(connection, ns.names.model_queue(model))
            assert abs((depth() or 0) - broker_depth) <= 3, (depth(), broker_depth)
        finally:
            for task in jobs:
                task.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)


async def test_jobs_in_an_unbound_model_queue_get_no_worker_not_their_deadline(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    settings = ns.settings(routing={"stats_interval_s": 0.3})
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        worker = make_worker(settings, model, "w1")
        async with worker:
            await wait_routable(controller, model)
        await wait_for(
            lambda: not controller.routing.routable(model), timeout=5, what=f"{model} unbound"
        )
        # Let a drain (if any) run over the empty queue first.
        await wait_for(
            lambda: all(t.done() for t in controller._drains.values()),
            timeout=5,
            what="no drain running",
        )
        connection = await stack.enter_async_context(broker(amqp_url))
        producer = await RawProducer.open(connection, controller.topology)
        # Straight into the unbound queue (as a job published just before the unbind would be).
        job_id = "late-job"
        message = aio_pika.Message(
            b'{"payload": 1}',
            content_type="application/json",
            message_id=job_id,
            correlation_id=job_id,
            reply_to=DIRECT_REPLY_TO,
        )
        sent = time.monotonic()
        await producer.channel.default_exchange.publish(
            message, routing_key=ns.names.model_queue(model)
        )
        reply = await producer.reply(job_id, within=3 * settings.routing.stats_interval_s + 2)
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.NO_WORKER
        assert time.monotonic() - sent < settings.client.timeout_s
        # A finished drain leaves nothing behind.
        await wait_for(lambda: model not in controller._drains, timeout=8, what="drain pruned")


# --- C: the registry does not freeze -----------------------------------------------------------


async def test_a_real_mass_death_is_evicted_within_the_bound_and_gets_no_worker(
    ns: Namespace,
) -> None:
    settings = ns.settings(heartbeat={"interval_s": 0.3, "timeout_s": 1.0, "sweep_interval_s": 0.1})
    hb = settings.heartbeat
    models = [ns.model(f"m{i}") for i in range(4)]
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        workers = [
            await stack.enter_async_context(make_worker(settings, model, f"w{i}"))
            for i, model in enumerate(models)
        ]
        for model in models:
            await wait_routable(controller, model)
        await wait_for(lambda: not controller.listen_only, what="the end of the listen window")
        client = await stack.enter_async_context(Client(settings))

        for worker in workers[:3]:  # most of the fleet dies at once; the broker is fine
            await crash(worker)
        crashed = time.monotonic()
        dead = {"w0", "w1", "w2"}
        # timeout + one probe interval + one sweep, plus a probe round trip and scheduling.
        bound_s = hb.timeout_s + hb.interval_s + hb.sweep_interval_s + 1.0
        await wait_for(
            lambda: not dead & {w.worker_id for w in controller.registry.workers()},
            timeout=bound_s,
            what="the dead workers evicted",
        )
        assert time.monotonic() - crashed <= bound_s
        assert "w3" in controller.registry
        assert not controller.suspect_broker

        for model in models[:3]:
            await wait_for(
                lambda m=model: not controller.routing.routable(m),
                timeout=5,
                what=f"{model} unbound",
            )
            with pytest.raises(NoWorkerError):
                await client.submit(model, {"n": 1}, timeout=5)
        assert await client.submit(models[3], {"n": 3}, timeout=5) == {"n": 3}


async def test_a_worker_restarted_under_its_old_id_is_registered_at_once(ns: Namespace) -> None:
    model = ns.model()
    # A long timeout: the old entry would stay for 5 s if the restart were not recognised.
    settings = ns.settings(heartbeat={"interval_s": 0.25, "timeout_s": 5.0})
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        old = make_worker(settings, model, "x", concurrency=1)
        await stack.enter_async_context(old)
        await wait_for(lambda: "x" in controller.registry, what="the first incarnation")
        old._seq = 10_000  # it has run for a while
        await wait_for(
            lambda: getattr(controller.registry.get("x"), "seq", 0) > 10_000,
            what="a late heartbeat of the first incarnation",
        )
        await crash(old)

        new = make_worker(settings, model, "x", concurrency=3)
        started = time.monotonic()
        await stack.enter_async_context(new)
        await wait_for(
            lambda: getattr(controller.registry.get("x"), "concurrency", 0) == 3,
            timeout=1.5,
            what="the new incarnation registered",
        )
        assert time.monotonic() - started < settings.heartbeat.timeout_s
        info = controller.registry.get("x")
        assert info is not None and info.seq < 10_000


# --- Topology.queue_counts reads the broker each time ------------------------------------------


async def test_queue_counts_are_read_fresh_on_a_robust_channel(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    settings = ns.settings()
    topology = Topology(ns.names, settings.routing, settings.heartbeat)
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel()
        await topology.declare_model_queue(channel, model)
        assert await topology.queue_counts(channel, model) == (0, 0)
        await channel.default_exchange.publish(
            aio_pika.Message(b"x"), routing_key=ns.names.model_queue(model)
        )
        # Confirmed publish: the message is in the queue; a cached count would still say 0.
        assert await topology.queue_counts(channel, model) == (1, 0)
    finally:
        await connection.close()


async def test_a_model_queue_redeclared_with_other_arguments_does_not_stop_the_controller(
    ns: Namespace, amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every bind of the hostile queue is refused (PRECONDITION_FAILED closes the channel); the
    controller backs off that model, logs it rarely, and everything else goes on."""
    hostile, model = ns.model("a"), ns.model("b")  # "a…" is planned before "b…"
    settings = ns.settings()
    async with AsyncExitStack() as stack:
        connection = await stack.enter_async_context(broker(amqp_url))
        channel = await connection.channel()
        await channel.declare_queue(ns.names.model_queue(hostile), durable=True)  # classic
        controller = await stack.enter_async_context(Controller(settings))
        exchange = await channel.get_exchange(ns.names.heartbeats)
        # A worker of the hostile model, heartbeats only.
        announcer = asyncio.create_task(announce(exchange, "fake", hostile))
        stack.callback(announcer.cancel)
        await wait_for(lambda: "fake" in controller.registry, what="the hostile model announced")
        await stack.enter_async_context(make_worker(settings, model, "w1"))
        await wait_routable(controller, model, within=8)
        client = await stack.enter_async_context(Client(settings))
        assert await client.submit(model, {"n": 1}, timeout=5) == {"n": 1}
        with pytest.raises(NoWorkerError):
            await client.submit("nobody-serves-this", {"n": 2}, timeout=5)
        assert not controller.routing.routable(hostile)
        refused = [r for r in caplog.records if hostile in r.getMessage()]
        assert 1 <= len(refused) <= 3, [r.getMessage() for r in refused]


async def test_the_dead_letter_tap_comes_back_after_its_queue_is_deleted(
    ns: Namespace, amqp_url: str
) -> None:
    settings = ns.settings()
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        connection = await stack.enter_async_context(broker(amqp_url))
        channel = await connection.channel()
        await channel.queue_delete(ns.names.dead_tap(controller.instance))
        dead = await channel.get_exchange(ns.names.dead)
        await dead_letters_counted_again(controller, dead)
        assert await queue_exists(connection, ns.names.dead_tap(controller.instance))


async def test_the_dead_letter_tap_is_bound_again_after_the_dead_exchange_comes_back(
    ns: Namespace, amqp_url: str
) -> None:
    """Bindings die with their exchange: {ns}.dead deleted and declared again leaves the tap
    queue unbound, and dead letters would go uncounted for good unless the controller re-binds
    it when it heals the base topology."""
    settings = ns.settings(routing={"stats_interval_s": 0.1})
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        connection = await stack.enter_async_context(broker(amqp_url))
        channel = await connection.channel()
        await channel.exchange_delete(ns.names.dead)
        dead = await channel.declare_exchange(
            ns.names.dead, aio_pika.ExchangeType.FANOUT, durable=True
        )
        await dead_letters_counted_again(controller, dead)


# --- round 2: loops that survive a dropped connection; bounded side effects ---------------------


def controller_connections(item: str) -> list[int]:
    """``item`` (channels, peer_port) of this process's controller connections, as the broker
    lists them."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "client_properties", item],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    name = f'"modelfleet-controller@{socket.gethostname()}:{os.getpid()}"'
    return [int(line.rsplit("\t", 1)[1]) for line in out.splitlines() if name in line]


def controller_channels() -> list[int]:
    return controller_connections("channels")


def silence_controller_socket() -> None:
    """Stop reading the controller's socket: the broker is untouched, but to the controller
    the connection goes silent, as in a network cut."""
    ports = controller_connections("peer_port")
    assert len(ports) == 1, ports
    transports = [
        o
        for o in gc.get_objects()
        # type(), not isinstance(): some objects (lazy import proxies) raise on __class__
        if issubclass(type(o), asyncio.Transport)
        and not o.is_closing()
        and (o.get_extra_info("sockname") or ("", 0))[1] == ports[0]
    ]
    assert len(transports) == 1, transports
    transports[0].pause_reading()


async def test_a_silent_connection_dropped_by_aiormq_leaves_every_loop_running(
    ns: Namespace, amqp_url: str
) -> None:
    """The socket goes silent (a network cut seen from our side); aiormq declares the
    connection stuck, fails its pending RPCs with CancelledError and aio-pika reconnects.
    Every core loop must survive that: heartbeats are consumed again and depths follow."""
    model = ns.model()
    settings = ns.settings(
        amqp={"heartbeat_s": 1},
        heartbeat={"interval_s": 0.5, "timeout_s": 2.0, "sweep_interval_s": 0.1},
        routing={"stats_interval_s": 0.3},
    )
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        await a_new_worker_registers(stack, controller, settings, model, "before")
        await wait_for(lambda: controller.healthy, timeout=5, what="healthy")
        assert controller._connection is not None and controller._connection.transport
        old = controller._connection.transport.connection
        silence_controller_socket()

        def replaced() -> bool:
            transport = controller._connection.transport if controller._connection else None
            return transport is not None and transport.connection is not old

        await wait_for(replaced, timeout=10, what="aiormq gave up on the silent connection")

        await a_new_worker_registers(stack, controller, settings, model, "after")
        await wait_for(lambda: controller.healthy, timeout=8, what="healthy again")
        assert controller.tasks_alive

        # The stats loop is alive too: the broker's consumer count (read only by that loop)
        # follows the second worker.
        def consumers() -> int | None:
            return next(f.consumers for f in controller.model_figures() if f.name == model)

        await wait_for(lambda: consumers() == 2, timeout=5, what="queue counts read again")


async def test_a_core_loop_that_ends_makes_healthz_503_and_run_fail(ns: Namespace) -> None:
    """Any way a core loop could end while the controller is not stopping (here: cancelled
    from outside): /healthz says so at once, and the service's run() raises, so the
    ``modelfleet controller`` process exits non-zero and its supervisor restarts it."""
    settings = ns.settings(http={"port": 0})
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        server = StatusServer(controller, "127.0.0.1", 0)
        await server.start()
        stack.push_async_callback(server.stop)
        await wait_for(lambda: controller.healthy, timeout=5, what="healthy")
        stats = next(t for t in controller._tasks if t.get_name() == "modelfleet-stats")
        stats.cancel()
        await wait_for(lambda: not controller.tasks_alive, timeout=5, what="the loop ended")
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{server.url}/healthz") as response,
        ):
            assert response.status == 503
            assert (await response.json())["tasks_alive"] is False
        assert controller.failure is not None and "modelfleet-stats" in controller.failure

    service = build_controller(settings)
    runner = asyncio.create_task(service.run())
    try:
        await wait_for(lambda: service.controller.tasks_alive, timeout=5, what="started")
        sweeper = next(t for t in service.controller._tasks if t.get_name() == "modelfleet-sweeper")
        sweeper.cancel()
        with pytest.raises(controller_module.ControllerFailedError, match="modelfleet-sweeper"):
            await asyncio.wait_for(asyncio.shield(runner), 10)
        assert isinstance(runner.exception(), BrokerError)  # the cli maps it to exit code 3
    finally:
        runner.cancel()
        with contextlib.suppress(BaseException):
            await runner


async def test_rerouting_a_model_whose_bind_is_refused_backs_off_and_logs_rarely(
    ns: Namespace, amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A live model whose queue was re-declared with other arguments: every job for it comes
    back through the unroutable queue. Each one gets NO_WORKER, but the refused bind is tried
    under the model's backoff and logged once, not once per job."""
    hostile = ns.model("a")
    settings = ns.settings(routing={"no_worker_grace_s": 0.5})
    async with AsyncExitStack() as stack:
        connection = await stack.enter_async_context(broker(amqp_url))
        channel = await connection.channel()
        await channel.declare_queue(ns.names.model_queue(hostile), durable=True)  # classic
        controller = await stack.enter_async_context(Controller(settings))
        exchange = await channel.get_exchange(ns.names.heartbeats)
        # A worker of the hostile model, heartbeats only.
        announcer = asyncio.create_task(announce(exchange, "fake", hostile))
        stack.callback(announcer.cancel)
        await wait_for(lambda: controller.registry.serving(hostile), what="hostile model live")
        await wait_for(lambda: not controller.listen_only, what="the end of the listen window")
        producer = await RawProducer.open(connection, Topology(ns.names))
        jobs = [await producer.publish(b'{"n": 1}', model=hostile) for _ in range(40)]
        for job_id in jobs:
            reply = await producer.reply(job_id, within=10)
            assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.NO_WORKER
        noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        # (Other lines may name the model under load, say an eviction of the fake worker.)
        about_it = [m for m in noisy if "re-rout" in m or (hostile in m and "failed" in m)]
        assert len(about_it) <= 3, about_it


async def test_a_base_topology_that_cannot_be_declared_does_not_leak_channels(
    ns: Namespace, amqp_url: str
) -> None:
    """``{ns}.jobs`` re-declared with other arguments: every attempt to declare the base
    topology is refused and closes its channel. The controller's channels stay bounded, and
    once the fault is gone it holds as many as before (none was left open unreferenced)."""
    settings = ns.settings(routing={"stats_interval_s": 0.1})
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        await wait_for(lambda: controller.healthy, timeout=5, what="healthy")
        await wait_for(lambda: len(controller_channels()) == 1, timeout=10, what="listed")
        baseline = controller_channels()[0]
        connection = await stack.enter_async_context(broker(amqp_url))
        channel = await connection.channel()
        await channel.exchange_delete(ns.names.jobs)
        # No alternate exchange: inequivalent to what the controller declares.
        await channel.declare_exchange(ns.names.jobs, aio_pika.ExchangeType.DIRECT, durable=True)
        seen = [baseline]
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            counts = controller_channels()
            assert counts, "the controller's connection is gone"
            seen.append(counts[0])
            await asyncio.sleep(0.3)
        assert max(seen) <= baseline + 2, seen

        await channel.exchange_delete(ns.names.jobs)  # the controller declares it again
        await wait_for(
            lambda: exchange_exists(connection, ns.names.jobs), timeout=10, what="redeclared"
        )
        # (The stats channel is opened lazily, so one fewer is fine; a leak is more.)
        await wait_for(
            lambda: len(listed := controller_channels()) == 1 and listed[0] <= baseline,
            timeout=10,
            what=f"back to {baseline} channels (seen {seen}) {controller_state(controller)}",
        )
        assert controller.tasks_alive


async def test_a_forged_probe_with_the_instance_id_does_not_pass_for_ours(
    ns: Namespace, amqp_url: str
) -> None:
    """The instance id is readable in the controller's queue name; a probe-typed message
    carrying it must not keep the controller's probe fresh (only its secret token does)."""
    settings = ns.settings(heartbeat={"interval_s": 2.0, "timeout_s": 6.0})
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        await wait_for(lambda: controller.health()["probe_age_s"] is not None, what="probing")
        connection = await stack.enter_async_context(broker(amqp_url))
        channel = await connection.channel()
        exchange = await channel.get_exchange(ns.names.heartbeats)
        ages: list[float] = []
        deadline = time.monotonic() + 4.5  # more than two probe intervals
        while time.monotonic() < deadline:
            forged = aio_pika.Message(controller.instance.encode(), type="modelfleet.probe")
            await exchange.publish(forged, "")
            await asyncio.sleep(0.1)
            ages.append(controller.health()["probe_age_s"])
        # Our own probe returns once per interval: its age climbs well past the forgeries'
        # 0.1 s cadence between returns. Accepted forgeries would hold it near 0.1 s.
        assert max(ages) > 1.0, ages


def controller_state(c: Controller) -> str:
    conn = c._connection.transport.connection  # type: ignore[union-attr]
    open_ = sorted(n for n, ch in conn.channels.items() if not ch.is_closed)
    refs = {
        k: (getattr(c, k) is not None and not getattr(c, k).is_closed)
        for k in ("_channel", "_stats_channel", "_hb_channel", "_nw_channel")
    }
    return f"open={open_} refs={refs} listed={controller_channels()}"
