"""The worker's own recovery under races and faults, on a real RabbitMQ: phantom consumers left
by a queue deleted and at once declared again, a stop whose grace ends during a hand-back, a
pause during a re-subscribe, a consumer cancel slower than its bound, a network outage, and a
re-subscribe that hangs while heartbeats must go on."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika.abc
import pytest
from aio_pika.abc import AbstractIncomingMessage

from modelfleet.jobs import Job
from modelfleet.messages import ResultReply
from modelfleet.worker import Worker
from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.integration.support import HeartbeatTap, broker, ready_count
from tests.integration.test_worker_recovery import consumers_of, job_body, routed, topology_of


async def _holds_for(check: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    """True if ``check`` holds at every look for ``seconds`` (polled, not slept through)."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if not await check():
            return False
        await asyncio.sleep(0.05)
    return True


# -- phantom consumers (a queue deleted and declared again at once: RabbitMQ 3.10) -------------


async def test_a_phantom_consumer_holding_a_small_burst_is_found(ns: Namespace) -> None:
    """Fewer jobs than the prefetch go to the phantom: none is left ready, and the broker
    counts the phantom as the queue's consumer. They are served all the same."""
    settings = ns.settings(worker={"prefetch": 4})
    model = ns.model()

    async def handle(job: Job) -> Any:
        return job.payload

    worker = Worker(
        handle, [model], settings=settings, install_signal_handlers=False, worker_id="burst"
    )
    queue = ns.names.model_queue(model)
    async with broker(ns.amqp_url) as connection, worker:
        admin = await connection.channel()
        await admin.queue_delete(queue)
        await topology_of(settings).declare_model_queue(admin, model)
        producer = await routed(connection, settings, model)
        ids = [await producer.publish(job_body(model, i), model=model) for i in range(3)]
        for i, job_id in enumerate(ids):
            reply = await producer.reply(job_id, within=10)
            assert isinstance(reply, ResultReply)
            assert reply.result == i
        assert await consumers_of(connection, queue) == 1


async def test_another_models_traffic_hides_no_phantom_and_survives_its_cure(
    ns: Namespace,
) -> None:
    """Model B keeps delivering while A's consumer is a phantom: A's jobs are served anyway,
    and replacing A's channel neither requeues nor repeats B's job running meanwhile."""
    settings = ns.settings(worker={"prefetch": 4})
    a, b = ns.model("a"), ns.model("b")
    release_b = asyncio.Event()
    runs: dict[str, int] = {}

    async def handle(job: Job) -> Any:
        runs[job.job_id] = runs.get(job.job_id, 0) + 1
        if job.payload == "long":
            await release_b.wait()
        return job.payload

    worker = Worker(
        handle, [a, b], settings=settings, install_signal_handlers=False, worker_id="multi"
    )
    async with broker(ns.amqp_url) as connection, worker:
        pb = await routed(connection, settings, b)
        long_b = await pb.publish(job_body(b, "long"), model=b)
        await wait_for(lambda: runs.get(long_b) == 1, what="B's long job running")
        admin = await connection.channel()
        await admin.queue_delete(ns.names.model_queue(a))
        await topology_of(settings).declare_model_queue(admin, a)
        pa = await routed(connection, settings, a)  # the binding went with the queue
        ids = [await pa.publish(job_body(a, i), model=a) for i in range(3)]

        async def tick() -> None:
            while True:
                await pb.publish(job_body(b, "tick"), model=b)
                await asyncio.sleep(0.1)

        ticker = asyncio.create_task(tick())
        try:
            for job_id in ids:
                assert isinstance(await pa.reply(job_id, within=10), ResultReply)
        finally:
            ticker.cancel()
        release_b.set()
        reply = await pb.reply(long_b, within=5)
        assert isinstance(reply, ResultReply)
        assert runs[long_b] == 1


# -- stop, pause and their races ---------------------------------------------------------------


async def test_a_stop_during_a_hand_back_hands_the_job_back_once(ns: Namespace) -> None:
    """Job 2 waits for the slot of job 1; job 1 ends inside the stop's grace, job 2 gets the
    slot and is handed back (a republish, confirmed slower than the rest of the grace). The
    grace ends during that confirm: the job must be in the queue once, not twice."""
    settings = ns.settings(worker={"prefetch": 4})
    model = ns.model()
    release = asyncio.Event()

    async def handle(job: Job) -> str:
        await release.wait()
        return "ok"

    worker = Worker(
        handle,
        [model],
        settings=settings,
        concurrency=1,
        install_signal_handlers=False,
        worker_id="handback",
    )
    real = worker._republish

    async def slow_republish(message: AbstractIncomingMessage) -> bool:
        await asyncio.sleep(0.6)  # a confirm slower than the grace left
        return await real(message)

    worker._republish = slow_republish  # type: ignore[method-assign]
    queue = ns.names.model_queue(model)
    async with broker(ns.amqp_url) as connection:
        await worker.start()
        producer = await routed(connection, settings, model)
        first = await producer.publish(job_body(model), model=model)
        await producer.publish(job_body(model), model=model)
        await wait_for(lambda: worker.in_flight == 1, what="job 1 running")
        stopping = asyncio.create_task(worker.stop(grace_s=0.3))
        await wait_for(lambda: worker.state.value == "draining", what="the stop under way")
        release.set()
        await stopping
        assert isinstance(await producer.reply(first, within=5), ResultReply)

        async def once() -> bool:
            return await ready_count(connection, queue) == 1

        await wait_for(once, what="job 2 back in the queue")
        assert await _holds_for(once, 1.0), "job 2 was handed back twice"
        assert worker.handed_back == 1


async def test_a_pause_during_a_resubscribe_leaves_no_consumer(ns: Namespace) -> None:
    """The watch re-subscribes a phantom consumer's queue; a pause lands while it declares.
    The paused worker must consume nothing (no hand-back loop)."""
    settings = ns.settings()  # prefetch = concurrency = 1: jobs wait ready
    model = ns.model()

    async def handle(job: Job) -> str:
        return "ok"

    worker = Worker(
        handle,
        [model],
        settings=settings,
        concurrency=1,
        install_signal_handlers=False,
        worker_id="pause",
    )
    in_declare = asyncio.Event()
    declared = asyncio.Event()
    real = worker.topology.declare_model_queue

    async def slow_declare(channel: Any, name: str, **options: Any) -> Any:
        in_declare.set()
        await asyncio.sleep(0.2)  # the declare's round trip, stretched
        try:
            return await real(channel, name, **options)
        finally:
            declared.set()

    queue = ns.names.model_queue(model)
    async with broker(ns.amqp_url) as connection:
        await worker.start()
        worker.topology.declare_model_queue = slow_declare  # type: ignore[method-assign]
        admin = await connection.channel()
        await admin.queue_delete(queue)
        await topology_of(settings).declare_model_queue(admin, model)
        producer = await routed(connection, settings, model)
        for i in range(3):
            await producer.publish(job_body(model, i), model=model)
        await asyncio.wait_for(in_declare.wait(), 10)
        await worker.pause()
        await asyncio.wait_for(declared.wait(), 5)

        async def unconsumed() -> bool:
            return await consumers_of(connection, queue) == 0

        try:
            await wait_for(unconsumed, timeout=3, what="no consumer while paused")
            assert await _holds_for(unconsumed, 1.0)
            assert worker.handed_back <= 3  # each job at most once, no loop
        finally:
            await worker.stop(grace_s=0)


async def test_a_slow_consumer_cancel_on_stop_requeues_no_running_job(ns: Namespace) -> None:
    """A basic.cancel slower than its bound (a loaded quorum queue; simulated by a bound of
    half a millisecond) must not close the job channel: the running job finishes within the
    grace and is answered once."""
    settings = ns.settings()
    model = ns.model()
    runs: list[int] = []

    async def handle(job: Job) -> str:
        runs.append(job.attempt)
        await asyncio.sleep(1.0)
        return "ok"

    worker = Worker(
        handle, [model], settings=settings, install_signal_handlers=False, worker_id="cancel"
    )
    async with broker(ns.amqp_url) as connection:
        await worker.start()
        producer = await routed(connection, settings, model)
        job_id = await producer.publish(job_body(model), model=model)
        await wait_for(lambda: worker.in_flight == 1, what="the job running")
        interval = worker.settings.heartbeat.interval_s
        # The bound is read as the stop begins; the loops read their interval once, at start.
        object.__setattr__(worker.settings.heartbeat, "interval_s", 0.0005)
        stopping = asyncio.create_task(worker.stop(grace_s=5))
        await asyncio.sleep(0)  # stop() has entered its consumer cancel
        object.__setattr__(worker.settings.heartbeat, "interval_s", interval)
        await stopping
        reply = await producer.reply(job_id, within=5)
        assert isinstance(reply, ResultReply)
        assert runs == [1]


# -- outages and the watch's own cost ----------------------------------------------------------


async def test_a_network_outage_is_no_reason_to_give_up(
    ns: Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's connection drops and reconnecting is refused for longer than the give-up
    time (the broker itself is untouched). An outage is aio-pika's to recover: the worker must
    not give up (exit 75), and it serves again once the network is back."""
    settings = ns.settings(heartbeat={"interval_s": 0.25, "timeout_s": 1.0})
    model = ns.model()
    stuck: list[float] = []

    async def handle(job: Job) -> Any:
        return job.payload

    worker = Worker(
        handle,
        [model],
        settings=settings,
        install_signal_handlers=False,
        worker_id="outage",
        on_stuck=lambda: stuck.append(time.monotonic()),
    )
    await worker.start()
    try:
        worker.resubscribe.give_up_s = 2.0  # 30 s by default: same path, shorter wait
        transports = [
            o
            for o in gc.get_objects()
            # type(), not isinstance(): some objects (lazy import proxies) raise on __class__
            if issubclass(type(o), asyncio.Transport)
            and not o.is_closing()
            and (o.get_extra_info("peername") or ("", 0))[1] == 5672
        ]
        assert transports
        real = aio_pika.abc.UnderlayConnection.make_connection.__func__  # type: ignore[attr-defined]
        down_until = time.monotonic() + 4.0

        async def refuse(cls: Any, *args: Any, **kwargs: Any) -> Any:
            if time.monotonic() < down_until:
                raise ConnectionRefusedError("simulated outage")
            return await real(cls, *args, **kwargs)

        monkeypatch.setattr(aio_pika.abc.UnderlayConnection, "make_connection", classmethod(refuse))
        for transport in transports:
            transport.abort()  # a network drop
        await wait_for(lambda: time.monotonic() >= down_until, timeout=6, what="the outage")
        async with broker(ns.amqp_url) as connection:
            producer = await routed(connection, settings, model)
            job_id = await producer.publish(job_body(model, "back"), model=model)
            reply = await producer.reply(job_id, within=10)
            assert isinstance(reply, ResultReply)
        assert not stuck, "an outage made the worker give up"
    finally:
        worker.on_stuck = lambda: None
        await worker.stop(grace_s=0)


async def test_a_hanging_resubscribe_delays_no_heartbeat(ns: Namespace) -> None:
    """The watch re-subscribes a phantom's queue and the declare hangs: the heartbeats keep
    their interval meanwhile (a late beat would get a healthy worker evicted)."""
    settings = ns.settings()  # prefetch = concurrency = 1: jobs wait ready
    model = ns.model()

    async def handle(job: Job) -> str:
        return "ok"

    worker = Worker(
        handle,
        [model],
        settings=settings,
        concurrency=1,
        install_signal_handlers=False,
        worker_id="beats",
    )
    hanging = asyncio.Event()
    release = asyncio.Event()
    real = worker.topology.declare_model_queue

    async def hang(channel: Any, name: str, **options: Any) -> Any:
        hanging.set()
        await release.wait()
        return await real(channel, name, **options)

    async with broker(ns.amqp_url) as connection:
        tap = await HeartbeatTap.open(connection, topology_of(settings))
        async with worker:
            worker.topology.declare_model_queue = hang  # type: ignore[method-assign]
            admin = await connection.channel()
            await admin.queue_delete(ns.names.model_queue(model))
            await topology_of(settings).declare_model_queue(admin, model)
            producer = await routed(connection, settings, model)
            for i in range(3):
                await producer.publish(job_body(model, i), model=model)
            await asyncio.wait_for(hanging.wait(), 10)
            start = len(tap.of("beats"))
            try:
                # 8 beats take 2 s at the 0.25 s interval.
                await wait_for(
                    lambda: len(tap.of("beats")) >= start + 8, timeout=4, what="8 heartbeats"
                )
                beats = [t for t, hb in tap.timed("beats")[start:]]
            finally:
                release.set()
        gaps = [later - earlier for earlier, later in itertools.pairwise(beats)]
        assert max(gaps) < settings.heartbeat.timeout_s / 2
