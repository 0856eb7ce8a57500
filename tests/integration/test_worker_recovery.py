"""The worker under faults the soak does not inject, on a real RabbitMQ: a refused heartbeat, a
job channel closed by the broker, a model queue deleted under it, duplicate deliveries, replies
lost with their channel, and restarts that must not spend a job's delivery limit."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiormq
import pytest
from aio_pika.abc import AbstractConnection

from modelfleet.config import Settings
from modelfleet.jobs import Final, Job
from modelfleet.messages import ChunkReply, ResultReply, WorkerState
from modelfleet.topology import Names, Topology, dead_reason
from modelfleet.worker import Worker
from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.integration.support import (
    ErrorQueue,
    HeartbeatTap,
    RawProducer,
    broker,
    queue_exists,
    ready_count,
)

WORKER = "worker-r"


def topology_of(settings: Settings) -> Topology:
    return Topology(Names(settings.namespace), settings.routing, settings.heartbeat)


def job_body(model: str, payload: Any = None, *, stream: bool = False) -> bytes:
    return json.dumps({"v": 1, "model": model, "payload": payload, "stream": stream}).encode()


async def routed(connection: AbstractConnection, settings: Settings, model: str) -> RawProducer:
    """A raw producer whose jobs reach ``model``'s queue (bound here: no controller runs)."""
    topology = topology_of(settings)
    channel = await connection.channel()
    await topology.declare_jobs(channel)
    await topology.bind_model(channel, model)
    await channel.close()
    return await RawProducer.open(connection, topology)


@asynccontextmanager
async def serving(
    settings: Settings, handler: Any, model: str, **options: Any
) -> AsyncIterator[Worker]:
    options.setdefault("worker_id", WORKER)
    worker = Worker(handler, [model], settings=settings, install_signal_handlers=False, **options)
    async with worker:
        yield worker


async def consumers_of(connection: AbstractConnection, queue: str) -> int:
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.consumer_count or 0)
    finally:
        await channel.close()


async def queue_is_empty(connection: AbstractConnection, queue: str) -> bool:
    return await ready_count(connection, queue) == 0


def finals(producer: RawProducer, job_id: str) -> list[Any]:
    return [r for r in producer.replies.get(job_id, []) if not isinstance(r, ChunkReply)]


# -- heartbeats on a channel of their own ------------------------------------------------------


async def test_a_refused_heartbeat_leaves_the_running_job_alone(
    ns: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    """The heartbeats exchange is deleted while a job runs: the broker refuses every heartbeat
    (NOT_FOUND closes the channel it came on). The job still finishes, once, and is answered
    once; heartbeats flow again once the exchange is back."""
    caplog.set_level(logging.WARNING, logger="modelfleet.worker")
    settings = ns.settings()
    model = ns.model()
    runs: list[Job] = []
    release = asyncio.Event()

    async def handle(job: Job) -> str:
        runs.append(job)
        await release.wait()
        return "done"

    async with broker(ns.amqp_url) as connection, serving(settings, handle, model) as worker:
        producer = await routed(connection, settings, model)
        job_id = await producer.publish(job_body(model), model=model)
        await wait_for(lambda: worker.in_flight == 1, what="the job to start")

        admin = await connection.channel()
        await admin.exchange_delete(ns.names.heartbeats)
        await wait_for(
            lambda: "heartbeat not sent" in caplog.text, what="a heartbeat refused by the broker"
        )
        release.set()
        reply = await producer.reply(job_id)
        assert isinstance(reply, ResultReply), reply
        assert reply.result == "done"
        assert len(runs) == 1
        assert worker.counters["ok"] == 1
        assert worker.counters["requeued"] == 0

        await topology_of(settings).declare_heartbeats(admin)
        tap = await HeartbeatTap.open(connection, topology_of(settings))
        await wait_for(lambda: bool(tap.of(WORKER)), what="heartbeats after the exchange is back")
        assert tap.of(WORKER)[-1].state == WorkerState.READY
        assert tap.of(WORKER)[-1].started_at == pytest.approx(worker.started_at)
        # Nothing ran twice, nothing else was answered.
        assert len(runs) == 1
        assert len(producer.replies[job_id]) == 1


# -- running jobs are deliveries, not job ids ----------------------------------------------------


async def test_two_deliveries_of_one_job_id_are_two_running_jobs(ns: Namespace) -> None:
    settings = ns.settings(worker={"stuck_after_s": 0.3})
    model = ns.model()
    release = asyncio.Event()
    started: list[Job] = []

    async def handle(job: Job) -> str:
        started.append(job)
        await release.wait()
        return "done"

    async with broker(ns.amqp_url) as connection:
        tap = await HeartbeatTap.open(connection, topology_of(settings))
        async with serving(settings, handle, model, concurrency=2) as worker:
            producer = await routed(connection, settings, model)
            # A producer may publish one id twice (a retry after a lost confirm).
            await producer.publish(job_body(model, 1), model=model, job_id="same-id")
            await producer.publish(job_body(model, 2), model=model, job_id="same-id")
            await wait_for(lambda: len(started) == 2, what="both deliveries to start")
            assert worker.in_flight == 2

            def both_stuck() -> bool:
                beats = tap.of(WORKER)
                return bool(beats) and beats[-1].stuck_jobs == 2 and beats[-1].in_flight == 2

            await wait_for(both_stuck, what="a heartbeat showing both deliveries stuck")
            release.set()
            await wait_for(lambda: worker.counters["ok"] == 2, what="both answered")
            assert worker.in_flight == 0
            results = [r for r in producer.replies["same-id"] if isinstance(r, ResultReply)]
            assert len(results) == 2
            # Each delivery is its own attempt.
            assert results[0].attempt_id != results[1].attempt_id


# -- a reply lost with its channel ----------------------------------------------------------------


async def test_a_stream_whose_channel_dies_is_redelivered_not_failed(ns: Namespace) -> None:
    """The broker closes the worker's job channel while a chunk is being published. That is
    no handler error — no WORKER_ERROR, no copy in the error queue — the broker redelivers the
    job and the next attempt answers it, under a new attempt id; the first sends nothing more."""
    settings = ns.settings()
    model = ns.model()
    attempts: list[int] = []

    async def handle(job: Job) -> AsyncIterator[Any]:
        attempts.append(job.attempt)
        # The first attempt streams until its channel dies; the second one ends.
        for i in range(100_000 if job.attempt == 1 else 3):
            yield i
            await asyncio.sleep(0)
        yield Final("done")

    async with broker(ns.amqp_url) as connection, serving(settings, handle, model) as worker:
        errors = await ErrorQueue.open(connection, topology_of(settings))
        producer = await routed(connection, settings, model)
        job_id = await producer.publish(job_body(model, stream=True), model=model)
        await wait_for(lambda: len(producer.replies.get(job_id, [])) >= 20, what="20 chunks")

        # A channel-level error on the job channel: a declaration the broker refuses. aiormq
        # holds the channel's lock until the answer (here: the channel's closing), so the
        # stream's next publish is under way, waiting for it, when the channel dies.
        assert worker._channel is not None
        doomed = await worker._channel.get_underlay_channel()
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await doomed.queue_declare(
                ns.names.model_queue(model), durable=True, arguments={"x-max-length": 1}
            )

        await wait_for(lambda: bool(finals(producer, job_id)), what="the job's answer")
        [answer] = finals(producer, job_id)
        assert isinstance(answer, ResultReply), answer
        assert answer.result == "done"
        assert attempts == [1, 2]
        await errors.pull()
        assert errors.of(job_id) == []
        assert worker.counters["worker_error"] == 0
        assert worker.replies_lost == 1
        chunks = [r for r in producer.replies[job_id] if isinstance(r, ChunkReply)]
        second = [c.data for c in chunks if c.attempt_id == answer.attempt_id]
        first = [c for c in chunks if c.attempt_id != answer.attempt_id]
        assert second == [0, 1, 2]
        assert len(first) >= 20
        assert len({c.attempt_id for c in first}) == 1
        assert [c.data for c in first] == list(range(len(first)))


# -- restarts and pauses do not spend the delivery limit ----------------------------------------


async def test_restarts_do_not_spend_the_delivery_limit_of_jobs_that_never_started(
    ns: Namespace,
) -> None:
    """delivery_limit=1 and four jobs; each worker holds them all (prefetch 4, concurrency 1),
    runs one and is stopped: the others never started and go back. Four restarts later every
    job is answered once and none was dead-lettered."""
    settings = ns.settings(routing={"delivery_limit": 1}, worker={"prefetch": 4})
    model = ns.model()
    ran: list[Any] = []

    async def handle(job: Job) -> Any:
        ran.append(job.payload)
        await asyncio.sleep(0.1)
        return job.payload

    async with broker(ns.amqp_url) as connection:
        errors = await ErrorQueue.open(connection, topology_of(settings))
        channel = await connection.channel()
        await topology_of(settings).declare_model_queue(channel, model)
        producer = await routed(connection, settings, model)
        ids = [await producer.publish(job_body(model, i), model=model) for i in range(4)]
        queue = ns.names.model_queue(model)
        workers: list[Worker] = []

        async def all_settled() -> bool:  # answered, or dead-lettered by the broker
            await errors.pull()
            dead_ids = {m.message_id for m in errors.seen}
            return all(i in producer.replies or i in dead_ids for i in ids)

        for round_ in range(4):
            if await all_settled():
                break
            worker = Worker(
                handle,
                [model],
                settings=settings,
                concurrency=1,
                worker_id=f"w{round_}",
                install_signal_handlers=False,
            )
            await worker.start()
            await wait_for(lambda w=worker: w.in_flight == 1, what=f"round {round_}: a job")
            await wait_for(
                lambda: queue_is_empty(connection, queue), what="the rest held by the worker"
            )
            await worker.stop()
            workers.append(worker)
        await wait_for(all_settled, what="every job answered or dead-lettered")
        assert [dead_reason(m.headers) for m in errors.seen] == []
        assert sorted(ran) == [0, 1, 2, 3]
        for job_id in ids:
            [reply] = producer.replies[job_id]
            assert isinstance(reply, ResultReply)
        assert sum(w.handed_back for w in workers) == 3 + 2 + 1
        assert await consumers_of(connection, ns.names.model_queue(model)) == 0


async def test_a_pause_hands_back_held_jobs_without_spending_their_limit(ns: Namespace) -> None:
    """delivery_limit=1; four jobs, one runs and three wait for the slot when the worker is
    paused. Three pauses later (each handing the waiting ones back) all are answered once."""
    settings = ns.settings(routing={"delivery_limit": 1}, worker={"prefetch": 4})
    model = ns.model()
    release = asyncio.Event()
    ran: list[Any] = []

    async def handle(job: Job) -> Any:
        ran.append(job.payload)
        await release.wait()
        return job.payload

    async with broker(ns.amqp_url) as connection:
        errors = await ErrorQueue.open(connection, topology_of(settings))
        async with serving(settings, handle, model, concurrency=1) as worker:
            producer = await routed(connection, settings, model)
            ids = [await producer.publish(job_body(model, i), model=model) for i in range(4)]
            await wait_for(lambda: worker.in_flight == 1, what="one job running")
            queue = ns.names.model_queue(model)

            async def dead_lettered() -> bool:
                await errors.pull()
                return bool(errors.seen)

            async def running_again() -> bool:
                return worker.in_flight == 1 or await dead_lettered()

            for _ in range(3):
                # Paused with jobs held for the slot; the running one then finishes and the
                # held ones go back, never started. Resumed, they are held again.
                await wait_for(lambda: queue_is_empty(connection, queue), what="the rest held")
                await worker.pause()
                release.set()
                await wait_for(lambda: worker.in_flight == 0, what="the running job to end")
                release.clear()
                await worker.resume()
                await wait_for(running_again, what="a job running again")
                assert [dead_reason(m.headers) for m in errors.seen] == []
            release.set()
            await wait_for(lambda: all(i in producer.replies for i in ids), what="every answer")
        for job_id in ids:
            assert [type(r) for r in producer.replies[job_id]] == [ResultReply]
        assert sorted(ran) == [0, 1, 2, 3]
        assert worker.handed_back == 3 + 2 + 1
        await errors.pull()
        assert errors.seen == []


# -- no zombie: consumers come back ------------------------------------------------------------


@pytest.mark.parametrize("declared_again_by", ["someone_at_once", "the_worker"])
async def test_a_model_queue_deleted_under_the_worker_is_consumed_again(
    ns: Namespace, declared_again_by: str
) -> None:
    """The model queue is deleted under an idle worker. Declared again at once by someone else
    (RabbitMQ 3.10 then sends the worker no cancel, and the new queue hands its first jobs to a
    consumer the channel no longer serves), or by nobody but the worker itself: it is consumed
    again within seconds and the jobs submitted after are served."""
    settings = ns.settings()
    model = ns.model()

    async def handle(job: Job) -> Any:
        return job.payload

    queue = ns.names.model_queue(model)
    async with broker(ns.amqp_url) as connection, serving(settings, handle, model, concurrency=1):
        admin = await connection.channel()
        await admin.queue_delete(queue)
        if declared_again_by == "someone_at_once":
            await topology_of(settings).declare_model_queue(admin, model)
        else:
            await wait_for(lambda: queue_exists(connection, queue), what="the queue back")
        producer = await routed(connection, settings, model)
        # More jobs than the worker's prefetch (1): what the broker lost in the phantom
        # consumer is noticed by the jobs left waiting behind it.
        ids = [await producer.publish(job_body(model, i), model=model) for i in range(3)]
        for i, job_id in enumerate(ids):
            reply = await producer.reply(job_id, within=10)
            assert isinstance(reply, ResultReply)
            assert reply.result == i
        assert await consumers_of(connection, queue) == 1  # one consumer, not two


async def test_a_channel_error_on_the_job_channel_does_not_stop_the_worker(
    ns: Namespace,
) -> None:
    settings = ns.settings()
    model = ns.model()

    async def handle(job: Job) -> Any:
        return job.payload

    async with broker(ns.amqp_url) as connection, serving(settings, handle, model) as worker:
        producer = await routed(connection, settings, model)
        assert worker._channel is not None
        doomed = await worker._channel.get_underlay_channel()
        await doomed.basic_ack(999_999)  # PRECONDITION_FAILED: unknown delivery tag
        await wait_for(lambda: doomed.is_closed, what="the broker to close the job channel")
        job_id = await producer.publish(job_body(model, "after"), model=model)
        reply = await producer.reply(job_id, within=8)
        assert isinstance(reply, ResultReply)
        assert reply.result == "after"
        assert await consumers_of(connection, ns.names.model_queue(model)) == 1


async def test_a_worker_that_cannot_consume_again_says_draining_then_exits(
    ns: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    """The model queue is deleted and a queue of the same name with other arguments takes its
    place: no consumer can be restored. The worker never heartbeats ``ready`` meanwhile, and
    gives up with a clear log line (its on_stuck hook: by default, exit 75)."""
    caplog.set_level(logging.ERROR, logger="modelfleet.worker")
    settings = ns.settings()
    model = ns.model()
    gave_up = asyncio.Event()

    async def handle(job: Job) -> Any:
        return job.payload

    queue = ns.names.model_queue(model)
    async with broker(ns.amqp_url) as connection:
        tap = await HeartbeatTap.open(connection, topology_of(settings))
        worker = Worker(
            handle,
            [model],
            settings=settings,
            worker_id=WORKER,
            install_signal_handlers=False,
            on_stuck=gave_up.set,
        )
        async with worker:
            admin = await connection.channel()
            await admin.queue_delete(queue)
            await admin.declare_queue(queue, durable=True)  # a classic queue: arguments differ
            deleted_at = len(tap.of(WORKER))

            def draining() -> bool:
                return any(hb.state == WorkerState.DRAINING for hb in tap.of(WORKER)[deleted_at:])

            await wait_for(draining, timeout=5, what="a draining heartbeat")
            worker.resubscribe.give_up_s = 3.0
            await wait_for(gave_up.is_set, timeout=8, what="the worker to give up")
            states = [hb.state for hb in tap.of(WORKER)[deleted_at:]]
            first_draining = states.index(WorkerState.DRAINING)
            # At most the beat already on its way when the queue went; never ready after.
            assert WorkerState.READY not in states[first_draining:]
            assert first_draining <= 1
            assert states[-1] == WorkerState.STOPPING
            assert f"could not consume {queue} again" in caplog.text
            await admin.queue_delete(queue)
            await topology_of(settings).declare_model_queue(admin, model)
