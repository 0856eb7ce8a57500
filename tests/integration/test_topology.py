"""The broker topology on a real RabbitMQ: declarations, queue arguments, namespaces, the
alternate exchange and dead-letter reasons."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
import aiormq
import pytest

from modelfleet.client import Client
from modelfleet.controller import Controller
from modelfleet.errors import NoWorkerError
from modelfleet.jobs import Job
from modelfleet.topology import (
    REASON_HEADER,
    DeadReason,
    Topology,
    dead_reason,
    model_queue_arguments,
)
from modelfleet.worker import Worker
from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.integration.support import (
    ErrorQueue,
    RawProducer,
    broker,
    queue_exists,
    ready_count,
    wait_routable,
)


def job_body(model: str, payload: Any = None) -> bytes:
    return json.dumps({"v": 1, "model": model, "payload": payload}).encode()


@pytest.fixture
async def other_ns(amqp_url: str) -> AsyncIterator[Namespace]:
    namespace = Namespace(amqp_url)
    yield namespace
    await namespace.cleanup()


async def test_declare_base_twice_is_idempotent(ns: Namespace, amqp_url: str) -> None:
    settings = ns.settings()
    topology = Topology(ns.names, settings.routing, settings.heartbeat)
    async with broker(amqp_url) as connection:
        channel = await connection.channel()
        await topology.declare_base(channel)
        await topology.declare_base(channel)
        # Another process with its own Topology and channel: same names, same arguments.
        other = await connection.channel()
        await Topology(ns.names, settings.routing, settings.heartbeat).declare_base(other)
        assert not channel.is_closed
        assert not other.is_closed

        for queue in (ns.names.unroutable, ns.names.errors, ns.names.catalog):
            assert await queue_exists(connection, queue), queue
        for exchange in (ns.names.jobs, ns.names.unroutable, ns.names.dead, ns.names.heartbeats):
            await channel.get_exchange(exchange)  # passive: raises if missing

        # The wiring is whole and single: one dead copy is one message in the error queue.
        errors = await ErrorQueue.open(connection, topology)
        dead = await channel.get_exchange(ns.names.dead)
        await dead.publish(aio_pika.Message(b"x", message_id="probe"), routing_key="any")
        await errors.wait_job("probe")
        assert len(errors.of("probe")) == 1
        assert await ready_count(connection, ns.names.errors) == 0


async def test_model_queue_is_quorum_and_dead_letters_to_the_error_queue(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    settings = ns.settings(routing={"delivery_limit": 1})
    topology = Topology(ns.names, settings.routing, settings.heartbeat)
    async with broker(amqp_url) as connection:
        channel = await connection.channel()
        await topology.declare_base(channel)
        queue = await topology.declare_model_queue(channel, model)
        await topology.bind_model(channel, model)
        jobs = await channel.get_exchange(ns.names.jobs)
        errors = await ErrorQueue.open(connection, topology)

        # Quorum with DLX {ns}.dead: the same arguments but a classic type are refused.
        arguments = model_queue_arguments(ns.names, settings.routing)
        assert arguments["x-queue-type"] == "quorum"
        assert arguments["x-dead-letter-exchange"] == ns.names.dead
        assert arguments["x-delivery-limit"] == 1
        classic = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="x-queue-type"):
            await classic.declare_queue(
                ns.names.model_queue(model),
                durable=True,
                arguments={**arguments, "x-queue-type": "classic"},
            )

        # x-delivery-limit=1: a job handed back twice is dead-lettered, never requeued forever;
        # the delivery count header (a quorum queue feature) counts the attempts.
        crashy_job = aio_pika.Message(job_body(model), message_id="crashy")
        await jobs.publish(crashy_job, routing_key=model)
        counts = []
        for _ in range(2):
            message = await queue.get(timeout=5)
            counts.append((message.headers or {}).get("x-delivery-count"))
            await message.nack(requeue=True)
        assert counts == [0, 1]
        crashy = await errors.wait_job("crashy")
        assert dead_reason(crashy.headers) == DeadReason.DELIVERY_LIMIT
        assert await queue.get(fail=False, timeout=5) is None

        # DLX {ns}.dead: a rejected job reaches {ns}.errors with reason "rejected".
        await jobs.publish(aio_pika.Message(job_body(model), message_id="bad"), routing_key=model)
        message = await queue.get(timeout=5)
        await message.reject(requeue=False)
        rejected = await errors.wait_job("bad")
        assert dead_reason(rejected.headers) == DeadReason.REJECTED
        assert rejected.routing_key == model

        # Per-message TTL: a job nobody took in time dead-letters with reason "expired".
        await jobs.publish(
            aio_pika.Message(job_body(model), message_id="late", expiration=0.2), routing_key=model
        )
        late = await errors.wait_job("late")
        assert dead_reason(late.headers) == DeadReason.EXPIRED


async def test_redeclaring_a_model_queue_with_other_arguments_fails(
    ns: Namespace, amqp_url: str
) -> None:
    """Why one module owns queue arguments: a mismatch is a channel error at run time."""
    model = ns.model()
    first = ns.settings(routing={"delivery_limit": 3})
    second = ns.settings(routing={"delivery_limit": 5})
    async with broker(amqp_url) as connection:
        channel = await connection.channel()
        await Topology(ns.names, first.routing).declare_model_queue(channel, model)
        # Same settings: fine, any number of times.
        await Topology(ns.names, first.routing).declare_model_queue(channel, model)

        other = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="x-delivery-limit"):
            await Topology(ns.names, second.routing).declare_model_queue(other, model)
        assert other.is_closed
        # The queue itself is untouched and still usable with the original arguments.
        assert await queue_exists(connection, ns.names.model_queue(model))


async def test_two_namespaces_never_see_each_other(ns: Namespace, other_ns: Namespace) -> None:
    model = ns.model("shared")
    other_ns.models.add(model)  # the same model name in both namespaces
    calls: dict[str, list[str]] = {"a": [], "b": []}

    def handler_for(side: str) -> Any:
        async def handle(job: Job) -> dict[str, Any]:
            calls[side].append(job.job_id)
            return {"side": side, "n": job.payload}

        return handle

    settings_a, settings_b = ns.settings(), other_ns.settings()
    async with AsyncExitStack() as stack:
        controller_a = await stack.enter_async_context(Controller(settings_a))
        controller_b = await stack.enter_async_context(Controller(settings_b))
        worker_a = Worker(
            handler_for("a"),
            [model],
            settings=settings_a,
            worker_id="worker-a",
            install_signal_handlers=False,
        )
        worker_b = Worker(
            handler_for("b"),
            [model],
            settings=settings_b,
            worker_id="worker-b",
            install_signal_handlers=False,
        )
        await stack.enter_async_context(worker_a)
        await stack.enter_async_context(worker_b)
        client_a = await stack.enter_async_context(Client(settings_a))
        client_b = await stack.enter_async_context(Client(settings_b))
        await wait_routable(controller_a, model)
        await wait_routable(controller_b, model)

        # Several heartbeats of each worker have gone by; each controller knows only its own.
        def heard(controller: Controller, worker_id: str) -> bool:
            info = controller.registry.get(worker_id)
            return info is not None and info.heartbeats >= 4

        await wait_for(lambda: heard(controller_a, "worker-a") and heard(controller_b, "worker-b"))
        assert [w.worker_id for w in controller_a.registry.workers()] == ["worker-a"]
        assert [w.worker_id for w in controller_b.registry.workers()] == ["worker-b"]

        results_a = await asyncio.gather(*(client_a.submit(model, i) for i in range(5)))
        results_b = await asyncio.gather(*(client_b.submit(model, i) for i in range(5)))
        assert results_a == [{"side": "a", "n": i} for i in range(5)]
        assert results_b == [{"side": "b", "n": i} for i in range(5)]
        assert len(calls["a"]) == 5
        assert len(calls["b"]) == 5

        # B loses its only worker: B's jobs fail with NO_WORKER; A's worker never sees them.
        await worker_b.stop()
        await wait_for(lambda: not controller_b.routing.routable(model), what="B unbound")
        with pytest.raises(NoWorkerError) as caught:
            await client_b.submit(model, "lost", timeout=5)
        assert caught.value.model == model
        assert len(calls["a"]) == 5
        assert controller_a.routing.routable(model)
        assert await client_a.submit(model, 99) == {"side": "a", "n": 99}


async def test_job_for_an_unbound_model_lands_in_unroutable(ns: Namespace, amqp_url: str) -> None:
    unbound = ns.model("unbound")
    unknown = ns.model("unknown")  # never declared at all
    settings = ns.settings()
    topology = Topology(ns.names, settings.routing, settings.heartbeat)
    async with broker(amqp_url) as connection:
        producer = await RawProducer.open(connection, topology)
        channel = await connection.channel()
        await topology.declare_model_queue(channel, unbound)
        await topology.bind_model(channel, unbound)
        await topology.unbind_model(channel, unbound)  # as the controller does when it dies

        job_ids = {
            await producer.publish(job_body(unbound), model=unbound): unbound,
            await producer.publish(job_body(unknown), model=unknown): unknown,
        }
        unroutable = await channel.declare_queue(ns.names.unroutable, passive=True)
        caught: dict[str, str] = {}

        async def both_caught() -> bool:
            message = await unroutable.get(no_ack=True, fail=False)
            if message is not None:
                caught[message.message_id or ""] = message.routing_key or ""
            return len(caught) == 2

        await wait_for(both_caught, what="both jobs in the unroutable queue")
        # The routing key (the model) survives the alternate exchange: the no-worker handler
        # reads it to name the model in its error.
        assert caught == job_ids
        assert await ready_count(connection, ns.names.model_queue(unbound)) == 0

        # Bound again, the same model's jobs go to its queue and not to unroutable.
        await topology.bind_model(channel, unbound)
        await producer.publish(job_body(unbound), model=unbound)
        queue = ns.names.model_queue(unbound)

        async def queued() -> bool:
            return await ready_count(connection, queue) == 1

        await wait_for(queued, what="the job in the model queue")
        assert await ready_count(connection, ns.names.unroutable) == 0


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (None, "unknown"),
        ({}, "unknown"),
        ({REASON_HEADER: "no_worker"}, DeadReason.NO_WORKER),
        ({REASON_HEADER: b"worker_error"}, DeadReason.WORKER_ERROR),
        # Our own header wins over the broker's record of an earlier death.
        ({REASON_HEADER: "invalid", "x-first-death-reason": "expired"}, DeadReason.INVALID),
        ({"x-first-death-reason": "expired"}, DeadReason.EXPIRED),
        ({"x-first-death-reason": b"rejected"}, DeadReason.REJECTED),
        ({"x-first-death-reason": "delivery_limit"}, DeadReason.DELIVERY_LIMIT),
        ({"x-first-death-reason": "maxlen"}, DeadReason.OVERLOADED),
        ({"x-first-death-reason": "something-new"}, "something-new"),
        ({"x-death": [{"reason": "expired", "count": 1}]}, DeadReason.EXPIRED),
        ({"x-death": [{"reason": b"maxlen"}]}, DeadReason.OVERLOADED),
        ({"x-death": []}, "unknown"),
        ({"x-death": "garbage"}, "unknown"),
        ({"x-death": [{"count": 1}]}, "unknown"),
    ],
)
def test_dead_reason(headers: dict[str, Any] | None, reason: str) -> None:
    assert dead_reason(headers) == reason
