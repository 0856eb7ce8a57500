"""The controller on a real RabbitMQ: registry, eviction, listen window, unbinding and draining,
several controllers at once, and the HTTP status API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelfleet.client import Client
from modelfleet.config import Settings
from modelfleet.controller import REROUTED_HEADER, Controller
from modelfleet.errors import ErrorCode, NoWorkerError
from modelfleet.http import StatusServer
from modelfleet.jobs import Job
from modelfleet.messages import ErrorReply, WorkerState
from modelfleet.topology import MODEL_HEADER, REASON_HEADER, DeadReason, Topology
from modelfleet.worker import Worker
from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.integration.support import (
    ErrorQueue,
    RawProducer,
    broker,
    header,
    metric,
    ready_count,
    wait_routable,
)

WORKER = "worker-1"


async def echo(job: Job) -> Any:
    return job.payload


def make_worker(settings: Settings, model: str, worker_id: str = WORKER, **kw: Any) -> Worker:
    return Worker(
        echo, [model], settings=settings, worker_id=worker_id, install_signal_handlers=False, **kw
    )


async def kill(worker: Worker) -> None:
    """Simulate a crash: the connection goes, no final heartbeat is sent."""
    assert worker._connection is not None
    await worker._connection.close()


async def test_heartbeats_fill_the_registry(ns: Namespace) -> None:
    model = ns.model()
    settings = ns.settings()
    async with Controller(settings) as controller, make_worker(settings, model, concurrency=3):
        await wait_for(lambda: WORKER in controller.registry, what="registration")
        info = controller.registry.get(WORKER)
        assert info is not None
        assert info.models == (model,)
        assert info.concurrency == 3
        assert info.state is WorkerState.READY
        assert info.host == socket.gethostname()
        assert info.pid == os.getpid()
        assert info.in_flight == 0
        first_seq = info.seq

        # Heartbeats keep coming and refresh it.
        def refreshed() -> bool:
            latest = controller.registry.get(WORKER)
            return latest is not None and latest.seq >= first_seq + 3

        await wait_for(refreshed, what="three more heartbeats")
        latest = controller.registry.get(WORKER)
        assert latest is not None
        assert latest.first_seen == info.first_seen
        assert latest.last_heartbeat > info.last_heartbeat
        assert latest.age(controller.clock()) < settings.heartbeat.timeout_s
        assert controller.registry.live_models() == {model}
        await wait_routable(controller, model)
        assert metric(controller, "modelfleet_heartbeats_received_total") >= 4


def _heartbeat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": 1,
        "worker_id": "forged",
        "models": ["fine"],
        "concurrency": 1,
        "sent_at": time.time(),
        "interval_s": 0.25,
    }
    body.update(fields)
    return body


async def test_malformed_heartbeats_are_counted_and_never_stop_the_controller(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    settings = ns.settings(routing={"max_models": 2})
    bad: list[tuple[str, bytes]] = [
        ("not_json", b"not json"),
        ("not_json", b"\xff\xfe\x00"),
        ("schema", json.dumps(_heartbeat(concurrency="lots")).encode()),
        ("schema", json.dumps(_heartbeat(models="fine")).encode()),
        ("schema", json.dumps(_heartbeat(models=["a*b"])).encode()),
        ("schema", json.dumps(_heartbeat(in_flight=-1)).encode()),
        # json.dumps writes NaN literally; the schema refuses non-finite numbers.
        ("schema", json.dumps(_heartbeat(oldest_job_age_s=float("nan"))).encode()),
        ("schema", json.dumps(_heartbeat(sent_at=float("inf"))).encode()),
        ("too_large", json.dumps(_heartbeat(host="x" * 70_000)).encode()),
        ("version", json.dumps(_heartbeat(v=2)).encode()),
        ("models_cap", json.dumps(_heartbeat(models=["a", "b", "c"])).encode()),
        # A start time far ahead would win over the real worker of that id until then.
        ("clock", json.dumps(_heartbeat(started_at=time.time() + 1e6)).encode()),
    ]
    expected: dict[str, int] = {}
    for cause, _ in bad:
        expected[cause] = expected.get(cause, 0) + 1

    async with AsyncExitStack() as stack:
        connection = await stack.enter_async_context(broker(amqp_url))
        controller = await stack.enter_async_context(Controller(settings))
        channel = await connection.channel()
        exchange = await channel.get_exchange(ns.names.heartbeats)
        for _, body in bad:
            await exchange.publish(aio_pika.Message(body), routing_key="")

        def counted() -> float:
            return sum(
                metric(controller, "modelfleet_heartbeats_invalid_total", {"cause": cause})
                for cause in expected
            )

        await wait_for(lambda: counted() == len(bad), what="every bad heartbeat counted")
        for cause, count in expected.items():
            got = metric(controller, "modelfleet_heartbeats_invalid_total", {"cause": cause})
            assert got == count, cause
        assert len(controller.registry) == 0
        assert metric(controller, "modelfleet_heartbeats_received_total") == 0
        assert all(not task.done() for task in controller._tasks)

        # Still alive and well: a real worker registers and its model becomes routable.
        await stack.enter_async_context(make_worker(settings, model))
        await wait_for(lambda: WORKER in controller.registry, what="a valid worker")
        await wait_routable(controller, model)
        assert [w.worker_id for w in controller.registry.workers()] == [WORKER]


async def stop_heartbeating(worker: Worker) -> None:
    """Simulate a hung event loop's heartbeats: the connection stays, the beats stop."""
    assert worker._hb_task is not None
    worker._hb_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await worker._hb_task


@pytest.mark.parametrize("silence", [kill, stop_heartbeating], ids=["crash", "no-heartbeats"])
async def test_a_silent_worker_is_evicted_within_timeout_plus_sweep(
    ns: Namespace, silence: Any
) -> None:
    model = ns.model()
    settings = ns.settings()
    hb = settings.heartbeat
    async with Controller(settings) as controller, make_worker(settings, model) as worker:
        await wait_for(lambda: WORKER in controller.registry, what="registration")
        await wait_for(lambda: not controller.listen_only, what="the end of the listen window")
        info = controller.registry.get(WORKER)
        assert info is not None
        await silence(worker)
        killed = time.monotonic()
        await wait_for(
            lambda: WORKER not in controller.registry,
            timeout=hb.timeout_s + hb.sweep_interval_s + 1.0,
            what="eviction",
        )
        took = time.monotonic() - killed
        # Not before the timeout (counted from its last heartbeat), not long after it either.
        assert took >= hb.timeout_s - hb.interval_s - 0.05, took
        assert took <= hb.timeout_s + hb.sweep_interval_s + 0.4, took
        assert metric(controller, "modelfleet_evictions_total", {"reason": "timeout"}) == 1
        assert metric(controller, "modelfleet_evictions_total", {"reason": "stopping"}) == 0


async def test_nothing_is_evicted_or_unbound_during_the_listen_window(ns: Namespace) -> None:
    model = ns.model()
    settings = ns.settings(routing={"startup_listen_s": 2.0})
    listen = settings.startup_listen_s
    async with AsyncExitStack() as stack:
        worker = await stack.enter_async_context(make_worker(settings, model))
        client = await stack.enter_async_context(Client(settings))
        controller = await stack.enter_async_context(Controller(settings))
        assert controller.started_at is not None
        await wait_routable(controller, model)  # binding is always allowed
        await kill(worker)
        job = asyncio.create_task(client.submit(model, "queued", timeout=10))
        info = controller.registry.get(WORKER)
        assert info is not None

        def window_over() -> bool:
            # Read everything first: listen_only follows the clock, and once it is seen true,
            # it was true when these were read.
            gauge = metric(controller, "modelfleet_controller_listen_only")
            present = WORKER in controller.registry
            bound = controller.routing.routable(model)
            if not controller.listen_only:
                return True
            # Inside the window: the silent worker stays, its model stays bound, and the job
            # waits in its queue.
            assert gauge == 1
            assert present
            assert bound
            assert not job.done()
            return False

        await wait_for(window_over, timeout=listen + 1, what="the end of the listen window")
        last = controller.registry.get(WORKER)
        if last is not None:  # the sweeper may already have run
            # The window really held back an eviction: the worker was silent past the timeout.
            silent = controller.started_at + listen - last.last_heartbeat
            assert silent > settings.heartbeat.timeout_s

        await wait_for(lambda: WORKER not in controller.registry, what="eviction after the window")
        assert controller.clock() - controller.started_at >= listen
        try:
            await job
        except NoWorkerError as exc:
            assert exc.model == model
        else:
            raise AssertionError("the queued job should have failed with NO_WORKER")
        grace = settings.routing.no_worker_grace_s
        assert controller.clock() - controller.started_at >= listen + grace
        assert not controller.routing.routable(model)


async def test_unbound_model_backlog_gets_no_worker_and_a_returning_worker_routes_again(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model()
    settings = ns.settings()
    grace = settings.routing.no_worker_grace_s
    async with AsyncExitStack() as stack:
        connection = await stack.enter_async_context(broker(amqp_url))
        errors = await ErrorQueue.open(connection, Topology(ns.names, settings.routing))
        controller = await stack.enter_async_context(Controller(settings))
        worker = await stack.enter_async_context(make_worker(settings, model))
        client = await stack.enter_async_context(Client(settings))
        await wait_routable(controller, model)
        await wait_for(lambda: not controller.listen_only, what="the end of the listen window")

        # The worker dies; the model stays bound until eviction + grace, so jobs queue up.
        await kill(worker)
        jobs = [asyncio.create_task(client.submit(model, i, timeout=10)) for i in range(3)]
        queue = ns.names.model_queue(model)

        async def backlog() -> bool:
            return await ready_count(connection, queue) == 3

        await wait_for(backlog, what="three jobs waiting in the model queue")
        assert not any(job.done() for job in jobs)

        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        assert all(isinstance(o, NoWorkerError) for o in outcomes), outcomes
        failed = [o for o in outcomes if isinstance(o, NoWorkerError)]
        for exc in failed:
            assert exc.code == ErrorCode.NO_WORKER == 50005
            assert exc.model == model
            assert model in exc.message
        assert not controller.routing.routable(model)
        for exc in failed:
            copy = await errors.wait_job(exc.job_id)
            assert header(copy, REASON_HEADER) == DeadReason.NO_WORKER
            assert header(copy, MODEL_HEADER) == model
        assert await ready_count(connection, queue) == 0

        # Unbound: a new job fails at once through the alternate exchange.
        began = time.monotonic()
        try:
            await client.submit(model, "late", timeout=10)
        except NoWorkerError:
            pass
        else:
            raise AssertionError("expected NO_WORKER for an unbound model")
        assert time.monotonic() - began < 1.0
        await wait_for(
            lambda: (
                metric(
                    controller, "modelfleet_controller_dead_letters_total", {"reason": "no_worker"}
                )
                == 4
            ),
            what="four no_worker dead letters counted",
        )

        # A returning worker makes it routable again.
        returning = make_worker(settings, model, worker_id="worker-2")
        await stack.enter_async_context(returning)
        await wait_routable(controller, model)
        assert await client.submit(model, "back", timeout=5) == "back"

        # A clean stop unbinds after the grace, not after the heartbeat timeout.
        began = time.monotonic()
        await returning.stop()
        await wait_for(lambda: not controller.routing.routable(model), what="unbinding")
        took = time.monotonic() - began
        sweep = settings.heartbeat.sweep_interval_s
        assert grace <= took < grace + sweep + 0.3, took
        assert metric(controller, "modelfleet_evictions_total", {"reason": "stopping"}) == 1


async def test_two_controllers_on_one_namespace(ns: Namespace, amqp_url: str) -> None:
    model = ns.model()
    unknown = ns.model("unknown")
    settings = ns.settings()
    topology = Topology(ns.names, settings.routing)
    async with AsyncExitStack() as stack:
        connection = await stack.enter_async_context(broker(amqp_url))
        errors = await ErrorQueue.open(connection, topology)
        first = await stack.enter_async_context(Controller(settings, instance="c1"))
        second = await stack.enter_async_context(Controller(settings, instance="c2"))
        worker = await stack.enter_async_context(make_worker(settings, model, concurrency=8))
        client = await stack.enter_async_context(Client(settings))
        producer = await RawProducer.open(connection, topology)
        for controller in (first, second):
            await wait_routable(controller, model)
            await wait_for(lambda c=controller: WORKER in c.registry, what="registration")

        results = await asyncio.gather(*(client.submit(model, i, timeout=10) for i in range(30)))
        assert results == list(range(30))

        await wait_for(lambda: not first.listen_only and not second.listen_only)
        await kill(worker)

        def body(name: str) -> bytes:
            return json.dumps({"v": 1, "model": name, "payload": None}).encode()

        # A backlog in the (still bound) model queue, and jobs for a model nobody serves.
        queued = [await producer.publish(body(model), model=model, expiration=10) for _ in range(6)]

        async def backlog() -> bool:
            return await ready_count(connection, ns.names.model_queue(model)) == 6

        await wait_for(backlog, what="six queued jobs")
        stray = [
            await producer.publish(body(unknown), model=unknown, expiration=10) for _ in range(6)
        ]
        job_ids = queued + stray

        await wait_for(
            lambda: all(j in producer.replies for j in job_ids), what="every job answered"
        )
        copies = await errors.wait_count(len(job_ids))
        total = sum(
            metric(c, "modelfleet_controller_dead_letters_total", {"reason": "no_worker"})
            for c in (first, second)
        )
        assert total == len(job_ids)
        for job_id in job_ids:
            [reply] = producer.replies[job_id]
            assert isinstance(reply, ErrorReply)
            assert reply.code == ErrorCode.NO_WORKER
        assert sorted(m.message_id or "" for m in copies) == sorted(job_ids)
        assert all(header(m, REASON_HEADER) == DeadReason.NO_WORKER for m in copies)
        assert {r.model for j in queued for r in producer.replies[j]} == {model}
        assert {r.model for j in stray for r in producer.replies[j]} == {unknown}
        await errors.pull()
        assert len(errors.seen) == len(job_ids)


async def test_status_api(ns: Namespace) -> None:
    model = ns.model()
    settings = ns.settings(routing={"startup_listen_s": 1.5})
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        server = StatusServer(controller, "127.0.0.1", 0)
        await server.start()
        stack.push_async_callback(server.stop)
        assert server.port != 0
        http = await stack.enter_async_context(aiohttp.ClientSession(base_url=server.url))

        async with http.get("/healthz") as response:
            assert response.status == 503
            body = await response.json()
        assert body["healthy"] is False
        assert body["listen_only"] is True
        assert body["namespace"] == ns.name

        await stack.enter_async_context(make_worker(settings, model, concurrency=3))
        await wait_routable(controller, model)

        async def get(path: str) -> Any:
            async with http.get(path) as response:
                assert response.status == 200, path
                assert response.content_type == "application/json"
                return await response.json()

        async def depth_known() -> bool:
            return (await get("/v1/models"))["models"][0]["queue_depth"] is not None

        await wait_for(depth_known, what="the queue depth")
        models = await get("/v1/models")
        assert set(models) == {"models"}
        [entry] = models["models"]
        assert {"name", "workers", "capacity", "in_flight", "queue_depth", "routable"} <= set(entry)
        assert entry["name"] == model
        assert entry["workers"] == 1
        assert entry["capacity"] == 3
        assert entry["in_flight"] == 0
        assert entry["queue_depth"] == 0
        assert entry["routable"] is True

        workers = await get("/v1/workers")
        assert set(workers) == {"workers"}
        [w] = workers["workers"]
        required = {
            "worker_id",
            "models",
            "concurrency",
            "in_flight",
            "state",
            "last_heartbeat_age_s",
            "host",
            "pid",
        }
        assert required <= set(w)
        assert w["worker_id"] == WORKER
        assert w["models"] == [model]
        assert w["concurrency"] == 3
        assert w["in_flight"] == 0
        assert w["state"] == "ready"
        assert 0 <= w["last_heartbeat_age_s"] < settings.heartbeat.timeout_s
        assert w["host"] == socket.gethostname()
        assert w["pid"] == os.getpid()

        async def healthy() -> bool:
            async with http.get("/healthz") as response:
                return response.status == 200 and (await response.json())["healthy"] is True

        await wait_for(healthy, timeout=5, what="/healthz to turn 200")

        async with http.get("/metrics") as response:
            assert response.status == 200
            assert response.content_type == "text/plain"
            text = await response.text()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples[("modelfleet_workers", ())] == 1
        assert samples[("modelfleet_model_routable", (("model", model),))] == 1
        assert samples[("modelfleet_model_capacity", (("model", model),))] == 3
        assert samples[("modelfleet_controller_listen_only", ())] == 0
        assert samples[("modelfleet_heartbeats_received_total", ())] >= 1


async def test_a_job_that_raced_the_binding_is_rerouted_with_its_remaining_time(
    ns: Namespace, amqp_url: str
) -> None:
    """A live model whose queue is not bound (a race, or an operator's hand): the controller
    binds it and sends the job back to its queue with the time its producer has left."""
    model = ns.model()
    settings = ns.settings()
    topology = Topology(ns.names, settings.routing)
    async with AsyncExitStack() as stack:
        connection = await stack.enter_async_context(broker(amqp_url))
        controller = await stack.enter_async_context(Controller(settings))
        channel = await connection.channel()
        heartbeats = await channel.get_exchange(ns.names.heartbeats)

        async def ghost() -> None:
            """A worker that exists only in heartbeats: live, but nobody consumes its queue."""
            seq = 0
            while True:
                seq += 1
                body = _heartbeat(worker_id="ghost", models=[model], seq=seq, sent_at=time.time())
                beat = aio_pika.Message(json.dumps(body).encode())
                await heartbeats.publish(beat, routing_key="")
                await asyncio.sleep(settings.heartbeat.interval_s)

        beating = asyncio.create_task(ghost())

        async def stop_beating() -> None:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating

        stack.push_async_callback(stop_beating)
        await wait_routable(controller, model)
        await wait_for(controller._heard_everyone)
        await topology.unbind_model(channel, model)
        queue = await topology.declare_model_queue(channel, model)

        client = await stack.enter_async_context(Client(settings))
        submitted = time.monotonic()
        job = asyncio.create_task(client.submit(model, "raced", timeout=5))
        stack.push_async_callback(cancel_and_wait, job)
        message: aio_pika.abc.AbstractIncomingMessage | None = None

        async def rerouted() -> bool:
            nonlocal message
            message = await queue.get(no_ack=True, fail=False)
            return message is not None

        await wait_for(rerouted, what="the job back in its model queue")
        assert message is not None
        assert (message.headers or {}).get(REROUTED_HEADER) == 1
        assert json.loads(message.body)["payload"] == "raced"
        # Its time-to-live is what the producer has left of its 5 s, not more, not less.
        assert message.expiration is not None
        left = 5 - (time.monotonic() - submitted)
        assert left - 0.5 <= float(message.expiration) <= 5.0, message.expiration
        assert controller.routing.routable(model)
        assert not job.done()


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def test_labelled_counters_with_known_labels_are_exported_at_zero_from_the_start(
    ns: Namespace,
) -> None:
    settings = ns.settings()
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        server = StatusServer(controller, "127.0.0.1", 0)
        await server.start()
        stack.push_async_callback(server.stop)
        async with (
            aiohttp.ClientSession(base_url=server.url) as http,
            http.get("/metrics") as response,
        ):
            text = await response.text()
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        expected = [
            *(
                ("modelfleet_heartbeats_invalid_total", (("cause", cause),))
                for cause in (
                    "not_json",
                    "schema",
                    "version",
                    "too_large",
                    "models_cap",
                    "user",
                    "clock",
                )
            ),
            *(
                ("modelfleet_evictions_total", (("reason", reason),))
                for reason in ("timeout", "stopping", "stuck")
            ),
            *(
                ("modelfleet_dead_letters_total", (("model", "other"), ("reason", reason)))
                for reason in ("no_worker", "expired", "delivery_limit", "worker_error")
            ),
            ("modelfleet_controller_dead_letters_total", (("reason", "no_worker"),)),
            ("modelfleet_routing_changes_total", (("action", "bind"),)),
            ("modelfleet_routing_changes_total", (("action", "unbind"),)),
            ("modelfleet_replies_refused_total", (("reason", "not_direct_reply_to"),)),
        ]
        for key in expected:
            assert samples.get(key) == 0.0, key


async def test_an_error_reply_goes_only_to_a_direct_reply_to_address(
    ns: Namespace, amqp_url: str
) -> None:
    """A job for an unknown model whose reply_to names the catalog queue: the NO_WORKER reply
    must not be written into {ns}.catalog; the refusal is counted."""
    settings = ns.settings()
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        connection = await stack.enter_async_context(broker(amqp_url))
        errors = await ErrorQueue.open(connection, controller.topology)
        producer = await RawProducer.open(connection, controller.topology)

        async def catalog_written() -> bool:
            return await ready_count(connection, ns.names.catalog) == 1

        # After the listen window the controller writes its (empty) catalog.
        await wait_for(catalog_written, what="the catalog written")
        await producer.jobs.publish(
            aio_pika.Message(
                b'{"payload": 1}',
                content_type="application/json",
                message_id="hostile",
                correlation_id="hostile",
                reply_to=ns.names.catalog,
            ),
            routing_key="nobody-serves-this",
        )
        copy = await errors.wait_job("hostile")  # the controller has handled the job
        assert header(copy, REASON_HEADER) == DeadReason.NO_WORKER
        # The catalog queue holds at most the controller's own catalog (x-max-length 1: a reply
        # would have pushed it out), never an error reply.
        channel = await connection.channel()
        catalog = await channel.declare_queue(ns.names.catalog, passive=True)
        while (message := await catalog.get(no_ack=True, fail=False)) is not None:
            assert message.type != "error"
            assert set(json.loads(message.body)) == {"models", "written_at"}
        await wait_for(
            lambda: (
                metric(
                    controller,
                    "modelfleet_replies_refused_total",
                    {"reason": "not_direct_reply_to"},
                )
                == 1
            ),
            what="the refusal counted",
        )


async def test_catalog_names_that_fail_the_model_name_rule_are_dropped_and_counted(
    ns: Namespace, amqp_url: str
) -> None:
    good = ns.model()
    settings = ns.settings()
    async with broker(amqp_url) as connection:
        channel = await connection.channel()
        await Topology(ns.names, settings.routing, settings.heartbeat).declare_base(channel)
        planted = {"models": [good, "a*b", "x" * 300, "../etc", 42, "bad\nname"]}
        await channel.default_exchange.publish(
            aio_pika.Message(json.dumps(planted).encode()), routing_key=ns.names.catalog
        )
    async with Controller(settings) as controller:
        assert controller.routing.known() == {good}
        assert metric(controller, "modelfleet_catalog_names_invalid_total") == 5

        async def catalog_rewritten() -> bool:
            # The planted names must not stay in the catalog for the next controller to read.
            async with broker(amqp_url) as connection:
                channel = await connection.channel()
                catalog = await channel.declare_queue(ns.names.catalog, passive=True)
                message = await catalog.get(no_ack=False, fail=False)
                if message is None:
                    return False
                await message.nack(requeue=True)
                return bool(json.loads(message.body)["models"] == [good])

        await wait_for(catalog_rewritten, timeout=5, interval=0.2, what="the catalog rewritten")
