"""The producer's client on a real RabbitMQ: results, streams, many jobs at once, and every
error named for its cause."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
import aiormq
import pytest

from modelfleet.client import Client
from modelfleet.errors import (
    ErrorCode,
    InvalidJobError,
    InvalidModelError,
    JobTimeoutError,
    NoWorkerError,
    OverloadedError,
    WorkerError,
)
from modelfleet.handlers import fake_llm
from modelfleet.jobs import Final, Job
from modelfleet.topology import DEADLINE_HEADER, REASON_HEADER, DeadReason, Topology, dead_reason
from modelfleet.worker import Worker
from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.integration.support import (
    ErrorQueue,
    RawProducer,
    broker,
    fleet,
    header,
    ready_count,
)


async def echo(job: Job) -> Any:
    return job.payload


async def test_submit_returns_the_result(ns: Namespace) -> None:
    model = ns.model()
    payload = {"prompt": "héllo wörld ✓", "n": [1, 2.5, None, True], "nested": {"a": {"b": "c"}}}
    async with fleet(ns.settings(), echo, model) as f:
        assert await f.client.submit(model, payload, timeout=5) == payload
        assert await f.client.submit(model, timeout=5) is None
        assert f.client.pending == 0


async def test_stream_yields_chunks_in_order_then_the_result(ns: Namespace) -> None:
    model = ns.model()
    words = [f"w{i}" for i in range(30)]
    prompt = " ".join(words)
    async with fleet(ns.settings(), fake_llm, model) as f:
        async with f.client.stream(model, {"prompt": prompt}, timeout=5) as stream:
            chunks = [chunk async for chunk in stream]
            assert stream.job_id
            assert stream.model == model
        assert chunks == [{"text": w if i == 0 else f" {w}"} for i, w in enumerate(words)]
        assert "".join(c["text"] for c in chunks) == prompt
        assert stream.result == {"text": prompt, "words": 30}
        assert f.client.pending == 0


async def test_a_stream_that_fails_midway_raises_after_its_chunks(ns: Namespace) -> None:
    model = ns.model()

    async def handle(job: Job) -> AsyncIterator[Any]:
        yield 1
        yield 2
        raise RuntimeError("model fell over")
        yield Final(None)  # pragma: no cover

    async with fleet(ns.settings(), handle, model) as f:
        received: list[Any] = []
        with pytest.raises(WorkerError, match="model fell over") as caught:
            async for chunk in f.client.stream(model, None, timeout=5):
                received.append(chunk)
        assert received == [1, 2]
        assert caught.value.model == model
        assert f.client.pending == 0


async def test_two_hundred_concurrent_submits_over_one_client(
    ns: Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ns.model()

    async def handle(job: Job) -> Any:
        await asyncio.sleep(0.01)
        return {"echo": job.payload, "job": job.job_id}

    async with fleet(ns.settings(), handle, model, concurrency=50) as f:
        connection = f.client._connection
        assert connection is not None and connection.transport is not None
        channels_before = set(connection.transport.connection.channels)
        declared: list[Any] = []
        channel = f.client._channel
        assert channel is not None
        real_declare = channel.declare_queue

        async def spy(*args: Any, **kwargs: Any) -> Any:
            declared.append(args or kwargs)
            return await real_declare(*args, **kwargs)

        monkeypatch.setattr(channel, "declare_queue", spy)

        payloads = [{"i": i} for i in range(200)]
        results = await asyncio.gather(*(f.client.submit(model, p, timeout=20) for p in payloads))
        assert [r["echo"] for r in results] == payloads
        assert len({r["job"] for r in results}) == 200  # 200 distinct jobs, matched correctly
        assert f.client.pending == 0
        assert f.worker.counters["ok"] == 200
        # One channel and the direct reply-to carried them all: no queue, no channel per job.
        assert declared == []
        assert set(connection.transport.connection.channels) == channels_before


async def test_unknown_model_fails_with_no_worker_in_under_a_second(ns: Namespace) -> None:
    known = ns.model()
    unknown = ns.model("unknown")
    async with fleet(ns.settings(), echo, known) as f:
        await wait_for(f.controller._heard_everyone, what="the controller to hear everyone")
        began = time.monotonic()
        with pytest.raises(NoWorkerError) as caught:
            await f.client.submit(unknown, {"x": 1}, timeout=10)
        took = time.monotonic() - began
    assert took < 1.0, took
    error = caught.value
    assert error.code == ErrorCode.NO_WORKER == 50005
    assert error.model == unknown
    assert len(error.job_id) == 32
    assert unknown in error.message
    assert error.to_dict()["error"] == "NO_WORKER"


async def test_a_slow_handler_times_out(ns: Namespace, amqp_url: str) -> None:
    model = ns.model()

    async def handle(job: Job) -> str:
        if job.payload == "slow":
            await asyncio.sleep(3)
        return str(job.payload)

    async with broker(amqp_url) as connection, fleet(ns.settings(), handle, model) as f:
        errors = await ErrorQueue.open(connection, Topology(ns.names))
        began = time.monotonic()
        with pytest.raises(JobTimeoutError) as caught:
            await f.client.submit(model, "slow", timeout=0.5)
        took = time.monotonic() - began
        assert 0.5 <= took < 1.0, took
        error = caught.value
        assert error.code == ErrorCode.WORKER_TIMEOUT == 50006
        assert error.model == model
        assert len(error.job_id) == 32
        assert f.client.pending == 0

        # The worker stops the handler at the same deadline and records why.
        copy = await errors.wait_job(error.job_id)
        assert header(copy, REASON_HEADER) == DeadReason.EXPIRED
        assert await f.client.submit(model, "fast", timeout=5) == "fast"


async def test_a_job_whose_producer_gave_up_is_never_run(ns: Namespace, amqp_url: str) -> None:
    model = ns.model()
    # Queues bound by hand, no controller: the job must be published, not failed at once.
    settings = ns.settings(client={"fail_fast_without_controller": False})
    topology = Topology(ns.names, settings.routing, settings.heartbeat)
    ran: list[Any] = []

    async def handle(job: Job) -> Any:
        ran.append(job.payload)
        return job.payload

    async with AsyncExitStack() as stack:
        connection = await stack.enter_async_context(broker(amqp_url))
        channel = await connection.channel()
        await topology.declare_base(channel)
        await topology.bind_model(channel, model)  # routable, but nobody consumes
        errors = await ErrorQueue.open(connection, topology)
        client = await stack.enter_async_context(Client(settings))

        with pytest.raises(JobTimeoutError) as caught:
            await client.submit(model, "abandoned", timeout=0.5)
        copy = await errors.wait_job(caught.value.job_id)
        assert dead_reason(copy.headers) == DeadReason.EXPIRED
        assert await ready_count(connection, ns.names.model_queue(model)) == 0

        worker = Worker(handle, [model], settings=settings, install_signal_handlers=False)
        await stack.enter_async_context(worker)
        # FIFO: had the abandoned job still been queued, it would have run before this one.
        assert await client.submit(model, "fresh", timeout=5) == "fresh"
        assert ran == ["fresh"]


async def test_a_full_model_queue_is_overloaded(ns: Namespace, amqp_url: str) -> None:
    model = ns.model()
    settings = ns.settings(
        routing={"max_queue_length": 2},
        client={"fail_fast_without_controller": False},  # bound by hand, no controller
    )
    topology = Topology(ns.names, settings.routing, settings.heartbeat)
    async with AsyncExitStack() as stack:
        connection = await stack.enter_async_context(broker(amqp_url))
        channel = await connection.channel()
        await topology.declare_base(channel)
        await topology.bind_model(channel, model)
        producer = await RawProducer.open(connection, topology)
        accepted = 0
        for _ in range(10):  # quorum queues apply the cap a little late: publish until a nack
            try:
                await producer.publish(b'{"v": 1, "model": "%s"}' % model.encode(), model=model)
            except aiormq.exceptions.DeliveryError:
                break
            accepted += 1
        else:
            pytest.fail("the full queue never refused a job")
        assert accepted >= 2

        client = await stack.enter_async_context(Client(settings))
        began = time.monotonic()
        with pytest.raises(OverloadedError) as caught:
            await client.submit(model, "one more", timeout=5)
        assert time.monotonic() - began < 1.0
        error = caught.value
        assert error.code == ErrorCode.OVERLOADED == 42903
        assert error.model == model
        assert len(error.job_id) == 32
        assert await ready_count(connection, ns.names.model_queue(model)) == accepted


HOSTILE_NAMES = {
    "empty": "",
    "space": "a b",
    "wildcard-hash": "x#",
    "wildcard-star": "a*",
    "path": "../etc",
    "double-dot": "a..b",
    "leading-dot": ".hidden",
    "trailing-dot": "trailing.",
    "non-ascii": "ünïcode",
    "newline": "a\nb",
    "too-long": "x" * 101,
    "nul": "amq.gen\x00",
}


@pytest.mark.parametrize("name", list(HOSTILE_NAMES.values()), ids=list(HOSTILE_NAMES))
async def test_a_hostile_model_name_is_refused_before_anything_is_sent(
    ns: Namespace, amqp_url: str, name: str
) -> None:
    settings = ns.settings()
    async with broker(amqp_url) as connection, Client(settings) as client:
        with pytest.raises(InvalidModelError) as caught:
            await client.submit(name, {"x": 1}, timeout=5)
        error = caught.value
        assert error.code == ErrorCode.INVALID_MODEL == 40301
        assert error.job_id == "-"
        assert error.model == name[:100]
        with pytest.raises(InvalidModelError):
            client.stream(name, None)
        assert client.pending == 0
        # Nothing was published (no controller consumes the unroutable queue here).
        assert await ready_count(connection, ns.names.unroutable) == 0


class _Opaque:
    pass


@pytest.mark.parametrize(
    "payload", [object(), {"x": _Opaque()}, [1, {2, object()}]], ids=["object", "nested", "set"]
)
async def test_a_payload_that_is_not_json_is_an_invalid_job(
    ns: Namespace, amqp_url: str, payload: Any
) -> None:
    model = ns.model()
    async with broker(amqp_url) as connection, Client(ns.settings()) as client:
        with pytest.raises(InvalidJobError) as caught:
            await client.submit(model, payload, timeout=5)
        assert type(caught.value) is InvalidJobError
        assert caught.value.code == ErrorCode.INVALID_JOB == 40001
        assert caught.value.model == model
        assert "JSON" in caught.value.message
        assert client.pending == 0
        assert await ready_count(connection, ns.names.unroutable) == 0


async def test_job_messages_carry_their_identity_and_deadline(ns: Namespace, amqp_url: str) -> None:
    """What a job looks like on the wire: id, reply-to, TTL = timeout, persistent, JSON."""
    model = ns.model()
    settings = ns.settings(client={"fail_fast_without_controller": False})  # bound by hand
    topology = Topology(ns.names, settings.routing, settings.heartbeat)
    async with AsyncExitStack() as stack:
        connection = await stack.enter_async_context(broker(amqp_url))
        channel = await connection.channel()
        await topology.declare_base(channel)
        queue = await topology.declare_model_queue(channel, model)
        await topology.bind_model(channel, model)
        client = await stack.enter_async_context(Client(settings))
        task = asyncio.create_task(client.submit(model, {"k": "v"}, timeout=3))
        try:
            message: aio_pika.abc.AbstractIncomingMessage | None = None

            async def arrived() -> bool:
                nonlocal message
                message = await queue.get(no_ack=True, fail=False)
                return message is not None

            await wait_for(arrived, what="the job in its queue")
            assert message is not None
            assert message.routing_key == model
            assert message.message_id == message.correlation_id
            # The broker turns the direct reply-to address into this channel's own.
            assert (message.reply_to or "").startswith("amq.rabbitmq.reply-to.")
            assert message.content_type == "application/json"
            assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            assert message.expiration is not None
            assert 2.5 <= float(message.expiration) <= 3.0
            # The deadline header: integer epoch milliseconds, exact to the millisecond.
            deadline = (message.headers or {}).get(DEADLINE_HEADER)
            assert isinstance(deadline, int)
            assert abs(deadline / 1000 - (time.time() + 3)) < 0.6
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert client.pending == 0
