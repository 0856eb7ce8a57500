"""The worker on a real RabbitMQ: handler kinds, concurrency, heartbeats, failures, stopping."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from typing import Any

import aiormq
import pytest

from modelfleet.client import Client
from modelfleet.controller import Controller
from modelfleet.errors import ErrorCode, InvalidJobError, WorkerError
from modelfleet.jobs import Final, Job
from modelfleet.messages import ErrorReply, WorkerState
from modelfleet.topology import ERROR_HEADER, MODEL_HEADER, REASON_HEADER, DeadReason, Topology
from modelfleet.worker import Worker
from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.integration.support import (
    ErrorQueue,
    HeartbeatTap,
    RawProducer,
    broker,
    fleet,
    header,
    metric,
    wait_routable,
)

WORKER = "worker-1"


def topology_of(ns: Namespace) -> Topology:
    settings = ns.settings()
    return Topology(ns.names, settings.routing, settings.heartbeat)


# -- handler kinds ---------------------------------------------------------------------------


async def test_coroutine_handler_returns_the_result(ns: Namespace) -> None:
    model = ns.model()
    seen: list[Job] = []

    async def handle(job: Job) -> dict[str, str]:
        seen.append(job)
        return {"upper": job.payload["text"].upper()}

    async with fleet(ns.settings(), handle, model) as f:
        sent_at = time.time()
        assert await f.client.submit(model, {"text": "hello"}, timeout=5) == {"upper": "HELLO"}
        assert f.worker.counters["ok"] == 1

    [job] = seen
    assert job.model == model
    assert job.payload == {"text": "hello"}
    assert job.stream is False
    assert job.attempt == 1
    assert len(job.job_id) == 32
    assert job.deadline is not None
    assert abs(job.deadline - (sent_at + 5)) < 0.5


async def test_plain_function_runs_in_a_thread_and_heartbeats_keep_coming(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    threads: list[threading.Thread] = []

    def handle(job: Job) -> int:
        threads.append(threading.current_thread())
        time.sleep(1.2)  # blocks its thread, not the event loop
        return int(job.payload) * 2

    async with broker(amqp_url) as connection:
        tap = await HeartbeatTap.open(connection, topology_of(ns))
        async with fleet(ns.settings(), handle, model) as f:
            assert await f.client.submit(model, 21, timeout=10) == 42

    assert threads[0] is not threading.main_thread()
    # While the handler slept, the worker's event loop kept beating every 0.25 s.
    busy = [(t, hb) for t, hb in tap.timed(WORKER) if hb.in_flight == 1]
    assert len(busy) >= 3, [hb.in_flight for _, hb in tap.timed(WORKER)]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(busy)]
    assert max(gaps) < 0.6, gaps
    ages = [hb.oldest_job_age_s for _, hb in busy]
    assert ages == sorted(ages)
    assert ages[-1] >= 0.7


async def test_async_generator_streams_chunks_in_order(ns: Namespace) -> None:
    model = ns.model()

    async def handle(job: Job) -> AsyncIterator[Any]:
        for i in range(job.payload):
            yield {"i": i}
        yield Final({"count": job.payload})

    async with fleet(ns.settings(), handle, model) as f:
        async with f.client.stream(model, 40, timeout=5) as stream:
            chunks = [chunk async for chunk in stream]
        assert chunks == [{"i": i} for i in range(40)]
        assert stream.result == {"count": 40}
        assert stream.done
        # Not streamed: the caller gets the final value only.
        assert await f.client.submit(model, 3, timeout=5) == {"count": 3}


async def test_async_generator_without_final_collects_chunks(ns: Namespace) -> None:
    model = ns.model()

    async def handle(job: Job) -> AsyncIterator[Any]:
        for word in job.payload.split():
            yield word

    async with fleet(ns.settings(), handle, model) as f:
        assert await f.client.submit(model, "a b c", timeout=5) == ["a", "b", "c"]
        async with f.client.stream(model, "x y", timeout=5) as stream:
            assert await stream.collect() == ["x", "y"]
        assert stream.result is None


async def test_sync_generator_streams_and_its_return_value_is_the_result(ns: Namespace) -> None:
    model = ns.model()
    threads: list[threading.Thread] = []

    def handle(job: Job) -> Iterator[Any]:
        threads.append(threading.current_thread())
        yield from range(job.payload)
        return {"count": job.payload}

    async with fleet(ns.settings(), handle, model) as f:
        async with f.client.stream(model, 25, timeout=5) as stream:
            chunks = await stream.collect()
        assert chunks == list(range(25))
        assert stream.result == {"count": 25}
        assert await f.client.submit(model, 2, timeout=5) == {"count": 2}
    assert all(thread is not threading.main_thread() for thread in threads)


def _sync_final(job: Job) -> Iterator[Any]:
    yield "first"
    yield Final({"done": job.payload})
    yield "never sent"


async def _async_final(job: Job) -> AsyncIterator[Any]:
    yield "first"
    yield Final({"done": job.payload})
    yield "never sent"


@pytest.mark.parametrize("handler", [_sync_final, _async_final], ids=["sync", "async"])
async def test_final_ends_the_stream_with_its_value(ns: Namespace, handler: Any) -> None:
    model = ns.model()
    async with fleet(ns.settings(), handler, model) as f:
        async with f.client.stream(model, 7, timeout=5) as stream:
            assert await stream.collect() == ["first"]
        assert stream.result == {"done": 7}
        assert await f.client.submit(model, 8, timeout=5) == {"done": 8}


# -- concurrency and heartbeats --------------------------------------------------------------


@pytest.mark.parametrize(("prefetch", "held"), [(0, 1), (3, 3)])
async def test_prefetch_holds_jobs_beyond_the_running_ones(
    ns: Namespace, prefetch: int, held: int
) -> None:
    model = ns.model()
    settings = ns.settings(worker={"prefetch": prefetch})
    release = asyncio.Event()

    async def handle(job: Job) -> Any:
        await release.wait()
        return job.payload

    async with fleet(settings, handle, model, concurrency=1) as f:
        jobs = [asyncio.create_task(f.client.submit(model, i, timeout=10)) for i in range(4)]
        await wait_for(lambda: f.worker.in_flight == 1, what="one job running")

        async def queue_holds_the_rest() -> bool:
            async with broker(ns.amqp_url) as connection:
                channel = await connection.channel()
                declared = await channel.declare_queue(ns.names.model_queue(model), passive=True)
                return declared.declaration_result.message_count == 4 - held

        await wait_for(queue_holds_the_rest, what=f"{4 - held} job(s) left in the queue")
        assert f.worker.in_flight == 1  # the others wait for the slot, not the handler
        release.set()
        assert await asyncio.gather(*jobs) == [0, 1, 2, 3]


@pytest.mark.parametrize("n_models", [1, 2])
async def test_concurrency_cap_holds_across_models(ns: Namespace, n_models: int) -> None:
    models = [ns.model() for _ in range(n_models)]
    settings = ns.settings()
    running = 0
    peak = 0

    async def handle(job: Job) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.3)
        finally:
            running -= 1
        return job.payload

    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        await stack.enter_async_context(
            Worker(handle, models, settings=settings, concurrency=2, install_signal_handlers=False)
        )
        client = await stack.enter_async_context(Client(settings))
        for model in models:
            await wait_routable(controller, model)
        jobs = [(models[i % n_models], i) for i in range(6)]
        results = await asyncio.gather(*(client.submit(m, i, timeout=10) for m, i in jobs))
    assert results == list(range(6))
    assert peak == 2


async def test_heartbeats_carry_in_flight_and_oldest_job_age(ns: Namespace, amqp_url: str) -> None:
    model = ns.model()
    settings = ns.settings(worker={"stuck_after_s": 0.5})
    started = asyncio.Event()
    release = asyncio.Event()

    async def handle(job: Job) -> str:
        started.set()
        await release.wait()
        return "ok"

    async with broker(amqp_url) as connection:
        tap = await HeartbeatTap.open(connection, topology_of(ns))
        async with fleet(settings, handle, model) as f:
            task = asyncio.create_task(f.client.submit(model, None, timeout=10))
            try:
                await wait_for(started.is_set, what="the job to start")

                def busy_and_old() -> bool:
                    beats = tap.of(WORKER)
                    if not beats:
                        return False
                    return beats[-1].in_flight == 1 and beats[-1].oldest_job_age_s >= 0.6

                await wait_for(busy_and_old, what="a heartbeat with the job 0.6 s old")
                assert tap.of(WORKER)[-1].stuck_jobs == 1  # older than worker.stuck_after_s

                def controller_sees_it() -> bool:
                    info = f.controller.registry.get(WORKER)
                    return info is not None and info.in_flight == 1 and info.oldest_job_age_s >= 0.6

                await wait_for(controller_sees_it, what="the controller to see the running job")
                [status] = f.controller.workers_status()
                assert status["in_flight"] == 1
                assert status["stuck"] is True
                [model_status] = f.controller.models_status()
                assert model_status["in_flight"] == 1
            finally:
                release.set()
            assert await task == "ok"

            def idle() -> bool:
                beats = tap.of(WORKER)
                return bool(beats) and beats[-1].in_flight == 0 and beats[-1].counters.ok == 1

            await wait_for(idle, what="an idle heartbeat after the job")
            last = tap.of(WORKER)[-1]
            assert last.oldest_job_age_s == 0.0
            assert last.stuck_jobs == 0
            seqs = [hb.seq for hb in tap.of(WORKER)]
            assert seqs == sorted(seqs)


# -- failures --------------------------------------------------------------------------------


async def _raise_async(job: Job) -> Any:
    if job.payload == "boom":
        raise ValueError("kaboom 1234")
    return "fine"


def _raise_thread(job: Job) -> Any:
    if job.payload == "boom":
        raise ValueError("kaboom 1234")
    return "fine"


async def _raise_midstream(job: Job) -> AsyncIterator[Any]:
    yield "partial"
    if job.payload == "boom":
        raise ValueError("kaboom 1234")
    yield Final("fine")


@pytest.mark.parametrize(
    "handler", [_raise_async, _raise_thread, _raise_midstream], ids=["async", "thread", "stream"]
)
async def test_handler_exception_is_a_worker_error_and_the_worker_goes_on(
    ns: Namespace, amqp_url: str, handler: Any
) -> None:
    model = ns.model()
    async with broker(amqp_url) as connection, fleet(ns.settings(), handler, model) as f:
        errors = await ErrorQueue.open(connection, topology_of(ns))
        with pytest.raises(WorkerError) as caught:
            await f.client.submit(model, "boom", timeout=5)
        error = caught.value
        assert error.code == ErrorCode.WORKER_ERROR == 50001
        assert error.model == model
        assert len(error.job_id) == 32
        assert "ValueError" in error.message
        assert "kaboom 1234" in error.message

        copy = await errors.wait_job(error.job_id)
        assert header(copy, REASON_HEADER) == DeadReason.WORKER_ERROR
        assert "kaboom 1234" in header(copy, ERROR_HEADER)
        assert header(copy, MODEL_HEADER) == model
        assert json.loads(copy.body)["payload"] == "boom"

        # The same worker serves the next job.
        assert await f.client.submit(model, "again", timeout=5) == "fine"
        assert f.worker.counters["worker_error"] == 1
        assert f.worker.counters["ok"] == 1


async def test_invalid_jobs_get_an_error_reply_and_go_to_the_error_queue(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    calls: list[Job] = []

    async def handle(job: Job) -> Any:
        calls.append(job)
        return job.payload

    cases: dict[str, tuple[bytes, str | None]] = {
        "not json": (b"not json", "application/json"),
        "no model": (json.dumps({"v": 1, "payload": 1}).encode(), "application/json"),
        "wrong version": (json.dumps({"v": 2, "model": model}).encode(), "application/json"),
        "not json content": (json.dumps({"v": 1, "model": model}).encode(), "text/plain"),
        "other model": (json.dumps({"v": 1, "model": "someone-else"}).encode(), None),
    }
    topology = topology_of(ns)
    async with broker(amqp_url) as connection, fleet(ns.settings(), handle, model) as f:
        producer = await RawProducer.open(connection, topology)
        errors = await ErrorQueue.open(connection, topology)
        for name, (body, content_type) in cases.items():
            job_id = await producer.publish(body, model=model, content_type=content_type)
            reply = await producer.reply(job_id)
            assert isinstance(reply, ErrorReply), name
            assert reply.code == ErrorCode.INVALID_JOB == 40001, name
            assert reply.model == model, name
            assert reply.job_id == job_id, name
            copy = await errors.wait_job(job_id)
            assert header(copy, REASON_HEADER) == DeadReason.INVALID, name
            assert copy.body == body, name

        assert calls == []
        assert f.worker.counters["invalid"] == len(cases)
        assert await f.client.submit(model, "still serving", timeout=5) == "still serving"


async def test_payload_above_the_limit_is_refused(ns: Namespace, amqp_url: str) -> None:
    model = ns.model()
    worker_settings = ns.settings(worker={"max_payload_bytes": 1024})
    settings = ns.settings()  # the client's limit is the default 1 MiB
    calls: list[Job] = []

    async def handle(job: Job) -> Any:
        calls.append(job)
        return len(job.payload)

    async with AsyncExitStack() as stack:
        connection = await stack.enter_async_context(broker(amqp_url))
        errors = await ErrorQueue.open(connection, topology_of(ns))
        controller = await stack.enter_async_context(Controller(settings))
        worker = Worker(handle, [model], settings=worker_settings, install_signal_handlers=False)
        await stack.enter_async_context(worker)
        client = await stack.enter_async_context(Client(settings))
        await wait_routable(controller, model)

        with pytest.raises(InvalidJobError) as caught:
            await client.submit(model, "x" * 2000, timeout=5)
        assert caught.value.code == ErrorCode.INVALID_JOB
        assert "max_payload_bytes" in caught.value.message
        copy = await errors.wait_job(caught.value.job_id)
        assert header(copy, REASON_HEADER) == DeadReason.INVALID
        assert calls == []
        assert await client.submit(model, "x" * 100, timeout=5) == 100

        # A client with the same limit refuses before publishing anything.
        async with Client(worker_settings) as strict:
            with pytest.raises(InvalidJobError) as early:
                await strict.submit(model, "x" * 2000, timeout=5)
        assert early.value.job_id == "-"
        assert worker.counters["invalid"] == 1


# -- stopping --------------------------------------------------------------------------------


async def test_clean_stop_finishes_the_job_and_leaves_the_registry_at_once(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    settings = ns.settings()
    started = asyncio.Event()

    async def handle(job: Job) -> str:
        started.set()
        await asyncio.sleep(0.6)
        return "finished"

    async with AsyncExitStack() as stack:
        connection = await stack.enter_async_context(broker(amqp_url))
        tap = await HeartbeatTap.open(connection, topology_of(ns))
        controller = await stack.enter_async_context(Controller(settings))
        worker = Worker(
            handle, [model], settings=settings, worker_id=WORKER, install_signal_handlers=False
        )
        await stack.enter_async_context(worker)
        client = await stack.enter_async_context(Client(settings))
        await wait_routable(controller, model)
        await wait_for(lambda: WORKER in controller.registry, what="registration")

        task = asyncio.create_task(client.submit(model, None, timeout=10))
        await wait_for(started.is_set, what="the job to start")
        began = time.monotonic()
        await worker.stop()
        took = time.monotonic() - began
        assert await task == "finished"
        assert took < settings.worker.stop_grace_s

        # The controller drops it on the final heartbeat, well before heartbeat.timeout_s.
        await wait_for(
            lambda: WORKER not in controller.registry,
            timeout=settings.heartbeat.timeout_s / 2,
            what="the controller to remove the stopped worker",
        )
        assert metric(controller, "modelfleet_evictions_total", {"reason": "stopping"}) == 1
        assert metric(controller, "modelfleet_evictions_total", {"reason": "timeout"}) == 0

        await wait_for(lambda: tap.of(WORKER) and tap.of(WORKER)[-1].state == WorkerState.STOPPING)
        states = [hb.state for hb in tap.of(WORKER)]
        assert WorkerState.DRAINING in states
        assert states.index(WorkerState.DRAINING) < states.index(WorkerState.STOPPING)
        assert states.count(WorkerState.STOPPING) == 1
        final = tap.of(WORKER)[-1]
        assert final.in_flight == 0
        assert final.counters.ok == 1


async def test_stop_without_grace_hands_the_job_to_another_worker(ns: Namespace) -> None:
    model = ns.model()
    settings = ns.settings()
    first_started = asyncio.Event()
    second_saw: list[Job] = []

    async def slow(job: Job) -> str:
        first_started.set()
        await asyncio.sleep(30)
        return "first"

    async def quick(job: Job) -> str:
        second_saw.append(job)
        return "second"

    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        first = Worker(
            slow, [model], settings=settings, worker_id="first", install_signal_handlers=False
        )
        await stack.enter_async_context(first)
        client = await stack.enter_async_context(Client(settings))
        await wait_routable(controller, model)

        task = asyncio.create_task(client.submit(model, "job", timeout=10))
        await wait_for(first_started.is_set, what="the first worker to take the job")
        second = Worker(
            quick, [model], settings=settings, worker_id="second", install_signal_handlers=False
        )
        await stack.enter_async_context(second)
        await first.stop(grace_s=0)

        assert await task == "second"
        [job] = second_saw
        assert job.payload == "job"
        assert job.attempt == 2  # the broker counted the first delivery
        assert first.counters["requeued"] == 1
        assert first.counters["ok"] == 0


async def test_a_forged_delivery_count_does_not_make_a_first_delivery_a_retry(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    seen: list[Job] = []

    async def handle(job: Job) -> Any:
        seen.append(job)
        return job.payload

    async with broker(amqp_url) as connection, fleet(ns.settings(), handle, model) as f:
        producer = await RawProducer.open(connection, topology_of(ns))
        body = json.dumps({"v": 1, "model": model, "payload": "x"}).encode()
        job_id = await producer.publish(body, model=model, headers={"x-delivery-count": 7})
        reply = await producer.reply(job_id)
        assert not isinstance(reply, ErrorReply)
        [job] = seen
        assert job.attempt == 1
        assert f.worker.counters["ok"] == 1


async def test_a_failing_handler_logs_its_traceback_once_not_per_job(
    ns: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    model = ns.model()
    caplog.set_level(logging.ERROR, logger="modelfleet.worker")
    async with fleet(ns.settings(), _raise_async, model) as f:
        for _ in range(3):
            with pytest.raises(WorkerError):
                await f.client.submit(model, "boom", timeout=5)
        assert f.worker.counters["worker_error"] == 3
    tracebacks = [r for r in caplog.records if r.name == "modelfleet.worker" and r.exc_info]
    assert len(tracebacks) == 1
    assert "kaboom 1234" in caplog.text


# -- set-up ------------------------------------------------------------------------------------


class _FirstSetUpCrashes(Worker):
    """A worker whose first set-up ends the way RabbitMQ 3.10 ends it when a basic.consume meets
    a quorum queue another worker is still creating: its connection closed, INTERNAL_ERROR."""

    attempts = 0
    first: Any = None

    async def _open(self) -> None:
        type(self).attempts += 1
        await super()._open()
        if type(self).attempts == 1:
            type(self).first = self._connection
            raise aiormq.exceptions.ConnectionInternalError("INTERNAL_ERROR")


async def test_set_up_closed_by_the_broker_is_tried_again(ns: Namespace) -> None:
    model = ns.model()

    async def handle(job: Job) -> Any:
        return job.payload

    settings = ns.settings()
    controller = Controller(settings)
    async with controller, _FirstSetUpCrashes(handle, [model], settings=settings):
        assert _FirstSetUpCrashes.attempts == 2
        assert _FirstSetUpCrashes.first is not None and _FirstSetUpCrashes.first.is_closed
        await wait_routable(controller, model)
        async with Client(settings) as client:
            assert await client.submit(model, {"n": 1}, timeout=5) == {"n": 1}
