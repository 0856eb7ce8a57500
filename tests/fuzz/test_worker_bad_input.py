"""A running worker on a real RabbitMQ keeps serving through malformed jobs: each producer gets
INVALID_JOB (40001), each job lands in ``{ns}.errors`` with reason ``invalid``, each cause is
logged once and every drop is counted. Hostile model names are refused before anything is
declared or published."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from modelfleet.client import Client
from modelfleet.errors import ErrorCode, InvalidModelError
from modelfleet.jobs import Job
from modelfleet.messages import ErrorReply, ResultReply
from modelfleet.topology import MODEL_HEADER, REASON_HEADER, DeadReason, Topology
from modelfleet.worker import Worker
from tests.conftest import Namespace
from tests.fuzz.test_job_fuzz import HOSTILE_NAMES
from tests.helpers import wait_for
from tests.integration.support import (
    ErrorQueue,
    RawProducer,
    broker,
    fleet,
    header,
    metric,
    queue_exists,
    ready_count,
)

MAX_PAYLOAD = 4_096
WORKER = "worker-1"


async def echo(job: Job) -> Any:
    return job.payload


def job(model: str, **fields: Any) -> bytes:
    return json.dumps({"v": 1, "model": model, "payload": {"x": 1}, **fields}).encode()


async def model_queue_exists(connection: AbstractConnection, ns: Namespace, name: str) -> bool:
    try:
        return await queue_exists(connection, ns.names.model_queue(name))
    except ValueError:
        # pamqp (under aio-pika) refuses the queue name outright: no modelfleet process could
        # have declared it either.
        return False


async def test_malformed_jobs_get_invalid_job_and_the_worker_keeps_serving(
    ns: Namespace, amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelfleet.worker")
    model = ns.model()
    settings = ns.settings(worker={"max_payload_bytes": MAX_PAYLOAD})
    topology = Topology(ns.names, settings.routing, settings.heartbeat)
    # (cause, body, content type): every cause three times.
    bad: list[tuple[str, bytes, str | None]] = [
        ("not_json", b"{not json", "application/json"),
        ("not_json", b"\xff\xfe\x00\x01", None),
        ("not_json", b"[" * 5_000, "application/json"),
        ("schema", b"{}", "application/json"),  # missing fields
        ("schema", json.dumps({"v": 1, "payload": 1}).encode(), "application/json"),
        ("schema", b'{"v": 1, "model": "%s", "deadline": NaN}' % model.encode(), None),
        ("content_type", job(model), "text/plain"),
        ("content_type", job(model), "application/x-msgpack"),
        ("content_type", job(model), "application/json; charset=latin-1"),
        ("too_large", job(model, payload="x" * MAX_PAYLOAD), "application/json"),
        ("too_large", b"x" * (MAX_PAYLOAD + 1), "application/json"),
        ("too_large", job(model, payload=["y"] * 5_000), None),
        ("wrong_model", job("some-other-model"), "application/json"),
        ("wrong_model", job("llama"), "application/json"),
        ("wrong_model", job(model + "x"), "application/json"),
    ]

    async with AsyncExitStack() as stack:
        f = await stack.enter_async_context(fleet(settings, echo, model, worker_id=WORKER))
        connection = await stack.enter_async_context(broker(amqp_url))
        producer = await RawProducer.open(connection, topology)
        errors = await ErrorQueue.open(connection, topology)
        seq_before = f.controller.registry.get(WORKER).seq  # type: ignore[union-attr]

        sent = [
            (cause, await producer.publish(body, model=model, content_type=content_type))
            for cause, body, content_type in bad
        ]
        # Valid jobs whose timestamps are hostile: answered, and they must not break the
        # heartbeats (a forged sent_at once made the queue-wait sum infinite).
        odd = [
            await producer.publish(job(model, sent_at=-1e308), model=model),
            await producer.publish(job(model, sent_at=-1e308, deadline=1e308), model=model),
            await producer.publish(job(model, sent_at=1e308, stream=True), model=model),
        ]

        for cause, job_id in sent:
            reply = await producer.reply(job_id)
            assert isinstance(reply, ErrorReply), cause
            assert reply.code == ErrorCode.INVALID_JOB == 40001, cause
            assert reply.error == "INVALID_JOB"
            assert reply.job_id == job_id
            assert reply.model == model
        for job_id in odd:
            results = [r for r in [await producer.reply(job_id)] if isinstance(r, ResultReply)]
            assert results, producer.replies[job_id]

        copies = await errors.wait_count(len(sent), lambda m: header(m, REASON_HEADER) == "invalid")
        assert {m.message_id for m in copies} == {job_id for _, job_id in sent}
        assert all(header(m, MODEL_HEADER) == model for m in copies)
        assert all(header(m, REASON_HEADER) == DeadReason.INVALID for m in copies)

        # Counted: in the worker's counters, and in the controller's fleet job counters.
        assert f.worker.counters["invalid"] == len(sent)
        await wait_for(
            lambda: (
                metric(
                    f.controller, "modelfleet_jobs_total", {"model": model, "outcome": "invalid"}
                )
                == len(sent)
            ),
            what="invalid jobs in the fleet job counters",
        )
        # Logged once per cause, not once per job.
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.name == "modelfleet.worker" and r.levelno == logging.WARNING
        ]
        for cause in {cause for cause, _ in sent}:
            marker = "(invalid)" if cause == "invalid" else f"(invalid, {cause})"
            assert sum(marker in line for line in warnings) == 1, (cause, warnings)
        assert len(warnings) == len({cause for cause, _ in sent}), warnings

        # Still serving, still heartbeating.
        assert await f.client.submit(model, {"after": True}, timeout=5) == {"after": True}
        f.worker.heartbeat()
        await wait_for(
            lambda: f.controller.registry.get(WORKER).seq > seq_before + 2,  # type: ignore[union-attr]
            what="heartbeats still arriving",
        )
        assert all(not task.done() for task in f.controller._tasks)


async def test_hostile_model_names_are_refused_before_anything_is_declared(
    ns: Namespace, amqp_url: str
) -> None:
    settings = ns.settings()
    async with AsyncExitStack() as stack:
        connection = await stack.enter_async_context(broker(amqp_url))
        client = await stack.enter_async_context(Client(settings))
        started = time.monotonic()
        for name in HOSTILE_NAMES:
            with pytest.raises(InvalidModelError) as caught:
                await client.submit(name, {"prompt": "hi"}, timeout=5)
            assert caught.value.code == ErrorCode.INVALID_MODEL == 40301
            assert caught.value.job_id == "-"  # refused before a job existed
            with pytest.raises(InvalidModelError):
                client.stream(name, {"prompt": "hi"})
            with pytest.raises(ValueError, match="model name"):
                Worker(echo, [name], settings=settings, install_signal_handlers=False)
            with pytest.raises(ValueError, match="model name"):
                Worker(echo, ["fine", name], settings=settings, install_signal_handlers=False)
        assert time.monotonic() - started < 2  # no round trip to wait for
        assert client.pending == 0

        # Nothing was declared for them, nothing was published.
        for name in HOSTILE_NAMES:
            assert not await model_queue_exists(connection, ns, name), repr(name)
        assert await ready_count(connection, ns.names.unroutable) == 0
        assert await ready_count(connection, ns.names.errors) == 0


async def test_jobs_with_hostile_reply_addresses_do_not_stop_the_worker(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    settings = ns.settings()
    topology = Topology(ns.names, settings.routing, settings.heartbeat)
    async with AsyncExitStack() as stack:
        f = await stack.enter_async_context(fleet(settings, echo, model, worker_id=WORKER))
        connection = await stack.enter_async_context(broker(amqp_url))
        producer = await RawProducer.open(connection, topology)
        for reply_to in (
            "amq.rabbitmq.reply-to.garbage",
            "amq.rabbitmq.reply-to.",
            "no-such-queue",
            "",
        ):
            await producer.jobs.publish(
                aio_pika.Message(
                    job(model), content_type="application/json", reply_to=reply_to or None
                ),
                routing_key=model,
                mandatory=False,
            )

        # Replies go only to direct reply-to addresses: "amq.rabbitmq.reply-to." and
        # "no-such-queue" are refused as invalid before the job runs; the other two run (the
        # broker drops the undeliverable reply; no reply_to wants none).
        def done() -> bool:
            return f.worker.counters["ok"] + f.worker.counters["invalid"] == 4

        await wait_for(done, what="hostile-reply jobs done")
        await asyncio.sleep(0.3)
        # Settled once each: nothing closed the worker's channel, nothing was requeued or run
        # twice.
        assert f.worker.counters["ok"] == 2
        assert f.worker.counters["invalid"] == 2
        assert f.worker.counters["reply_refused"] == 2
        assert f.worker.counters["requeued"] == 0
        assert f.worker._channel is not None and not f.worker._channel.is_closed
        assert await ready_count(connection, ns.names.model_queue(model)) == 0
        assert await f.client.submit(model, "fine", timeout=5) == "fine"
