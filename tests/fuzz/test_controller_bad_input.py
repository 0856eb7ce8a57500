"""A running controller on a real RabbitMQ shrugs off malformed heartbeats and floods of fake
model names: every drop is counted and logged once per cause, nothing grows per bad input (no
queue, no metric series), and the fleet keeps working."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from prometheus_client.parser import text_string_to_metric_families

from modelfleet.client import Client
from modelfleet.config import Settings
from modelfleet.controller import MAX_HEARTBEAT_BYTES, Controller
from modelfleet.errors import NoWorkerError
from modelfleet.jobs import Job
from modelfleet.worker import Worker
from tests.conftest import Namespace
from tests.fuzz.strategies import dumps, nested, valid_heartbeat
from tests.helpers import wait_for
from tests.integration.support import broker, metric, queue_exists, wait_routable

WORKER = "worker-1"


async def echo(job: Job) -> Any:
    return job.payload


def make_worker(settings: Settings, model: str) -> Worker:
    return Worker(echo, [model], settings=settings, worker_id=WORKER, install_signal_handlers=False)


async def publish_heartbeats(
    connection: AbstractConnection, ns: Namespace, bodies: list[bytes]
) -> None:
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(ns.names.heartbeats)
    for body in bodies:
        await exchange.publish(aio_pika.Message(body), routing_key="")
    await channel.close()


def drop_logs(caplog: pytest.LogCaptureFixture, cause: str) -> int:
    return sum(
        1
        for r in caplog.records
        if r.name == "modelfleet.controller" and f"invalid heartbeat ({cause})" in r.getMessage()
    )


async def missing_queues(amqp_url: str, ns: Namespace, models: list[str]) -> int:
    """How many of ``models`` have no queue. Passive declares, one at a time per connection (a
    miss closes its channel, and aiormq can reuse a channel number too early when many channels
    open and close at once on one connection), on a few connections side by side."""

    async def missing(chunk: list[str]) -> int:
        async with broker(amqp_url) as connection:
            return sum([not await queue_exists(connection, ns.names.model_queue(m)) for m in chunk])

    return sum(await asyncio.gather(*(missing(models[i::4]) for i in range(4))))


def families(controller: Controller) -> dict[str, Any]:
    text = controller.metrics.render().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


async def test_a_burst_of_malformed_heartbeats_never_stops_the_controller(
    ns: Namespace, amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelfleet.controller")
    model = ns.model()
    future_model = ns.model("future")
    settings = ns.settings()

    def hb(**fields: Any) -> bytes:
        return dumps({**valid_heartbeat("forged", ["fine"]), **fields})

    thousands = dumps(valid_heartbeat("forged", [f"m{i}" for i in range(5_000)]))
    bad: dict[str, list[bytes]] = {
        "not_json": [b"not json", b"\xff\xfe\x00", b"{", nested(5_000), b"[" * 10_000],
        "schema": [
            hb(concurrency="lots"),
            hb(models="fine"),
            hb(worker_id=["a"]),
            hb(in_flight=-1),
            hb(pid=-(10**30)),
            hb(stuck_jobs=10**400),
            hb(oldest_job_age_s=float("nan")),  # a NaN literal on the wire
            hb(sent_at=float("inf")),  # Infinity
            hb(speed=float("-inf")),
            hb(interval_s=-1),
            hb(stats={"fine": {"jobs": {"ok": -1}}}),
            hb(stats={"fine": {"jobs": {"ok": 10**400}}}),
            hb(host="x" * 1_000),
            hb(models=["a*b"]),
            hb(models=["ll\u0430ma"]),
            json.dumps([1, 2, 3]).encode(),
            b"null",
        ],
        "too_large": [b"x" * 1_048_576, hb(host="x" * 70_000)],
        "version": [hb(v=2), hb(v="1.0")],
    }
    cause_of_thousands = "too_large" if len(thousands) > MAX_HEARTBEAT_BYTES else "schema"
    bad[cause_of_thousands].append(thousands)
    # Every cause twice over: counted each time, logged once.
    bodies = [body for group in bad.values() for body in group] * 2
    # Valid but with a clock far in the future: accepted, yet it must not skew the lag metric
    # nor keep the worker alive past its timeout on the controller's own clock.
    future = dumps({**valid_heartbeat("future-worker", [future_model]), "sent_at": 1e12, "seq": 1})
    past = dumps({**valid_heartbeat("past-worker", [future_model]), "sent_at": 0.0, "seq": 1})

    async with AsyncExitStack() as stack:
        connection = await stack.enter_async_context(broker(amqp_url))
        controller = await stack.enter_async_context(Controller(settings))
        await publish_heartbeats(connection, ns, [*bodies, future, past])

        def counted() -> float:
            return sum(
                metric(controller, "modelfleet_heartbeats_invalid_total", {"cause": cause})
                for cause in bad
            )

        await wait_for(lambda: counted() == len(bodies), what="every bad heartbeat counted")
        for cause, group in bad.items():
            got = metric(controller, "modelfleet_heartbeats_invalid_total", {"cause": cause})
            assert got == 2 * len(group), cause
            assert drop_logs(caplog, cause) == 1, cause
        assert all(not task.done() for task in controller._tasks)

        # The oddly dated workers: registered, no lag observed beyond what is plausible...
        odd = {"future-worker", "past-worker"}

        def registered() -> set[str]:
            return {w.worker_id for w in controller.registry.workers()}

        await wait_for(lambda: odd <= registered(), what="the oddly dated workers")
        lag_sum = metric(controller, "modelfleet_heartbeat_lag_seconds_sum")
        assert 0.0 <= lag_sum <= settings.heartbeat.queue_ttl_s
        # ...and evicted on the controller's clock once they fall silent.
        await wait_for(
            lambda: not odd & registered(),
            timeout=settings.startup_listen_s + settings.heartbeat.timeout_s + 3,
            what="the oddly dated workers evicted",
        )
        assert metric(controller, "modelfleet_evictions_total", {"reason": "timeout"}) == 2

        # Still alive and well: a real worker registers and a job is answered.
        await stack.enter_async_context(make_worker(settings, model))
        await wait_routable(controller, model)
        client = await stack.enter_async_context(Client(settings))
        assert await client.submit(model, {"n": 1}, timeout=5) == {"n": 1}
        assert controller.registry.model_names() == {model}


async def test_a_flood_of_fake_model_names_creates_no_queues_and_no_metric_series(
    ns: Namespace, amqp_url: str
) -> None:
    model = ns.model("real")
    settings = ns.settings(routing={"max_models": 10})
    fakes = [f"fake-{uuid.uuid4().hex[:8]}-{i}" for i in range(3_000)]

    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        await stack.enter_async_context(make_worker(settings, model))
        client = await stack.enter_async_context(Client(settings))
        await wait_routable(controller, model)

        results = await asyncio.gather(
            *(client.submit(fake, {"i": i}, timeout=20) for i, fake in enumerate(fakes)),
            return_exceptions=True,
        )
        not_no_worker = [r for r in results if not isinstance(r, NoWorkerError)]
        assert not_no_worker == []
        assert all(r.model == fake for r, fake in zip(results, fakes, strict=True))  # type: ignore[union-attr]

        # The controller remembers nothing per unknown name...
        assert controller.routing.known() == {model}
        assert controller.registry.model_names() == {model}
        assert set(controller._queue_counts) <= {model}
        assert set(controller._drains) == set()
        assert set(controller.fleet_stats.models) <= {model}
        # ...and declared nothing for them.
        assert await missing_queues(amqp_url, ns, fakes) == len(fakes)

        # Dead letters of unknown models are counted under model="other": bounded series.
        await wait_for(
            lambda: (
                metric(
                    controller,
                    "modelfleet_dead_letters_total",
                    {"model": "other", "reason": "no_worker"},
                )
                == len(fakes)
            ),
            what="every no-worker dead letter counted under 'other'",
        )
        found = families(controller)
        dead = found["modelfleet_dead_letters"].samples
        assert {s.labels["model"] for s in dead} <= {model, "other"}
        assert len(dead) <= 2 * 8
        for name, family in found.items():
            if name.startswith(("modelfleet_model_", "modelfleet_queue_")):
                assert {s.labels["model"] for s in family.samples} <= {model}, name
        assert metric(
            controller, "modelfleet_controller_dead_letters_total", {"reason": "no_worker"}
        ) == len(fakes)

        # The real model still serves.
        assert await client.submit(model, "still here", timeout=5) == "still here"


async def test_heartbeats_announcing_models_beyond_the_cap_are_refused(
    ns: Namespace, amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="modelfleet.controller")
    cap = 10
    settings = ns.settings(routing={"max_models": cap})
    model = ns.model("real")
    # Forged workers fill the cap, then others try to go past it.
    fillers = [ns.model("filler") for _ in range(cap - 1)]
    greedy = [f"greedy-{uuid.uuid4().hex[:8]}-{i}" for i in range(30)]
    refused = [
        dumps({**valid_heartbeat("greedy-1", greedy[:3])}),
        dumps({**valid_heartbeat("greedy-2", greedy[3:30])}),
        # A filler that tries to add a model on top of its own.
        dumps({**valid_heartbeat("filler", [*fillers, greedy[0]]), "seq": 2}),
    ]

    async with AsyncExitStack() as stack:
        connection = await stack.enter_async_context(broker(amqp_url))
        controller = await stack.enter_async_context(Controller(settings))
        await stack.enter_async_context(make_worker(settings, model))
        client = await stack.enter_async_context(Client(settings))
        await wait_routable(controller, model)

        filler = dumps({**valid_heartbeat("filler", fillers), "seq": 1})
        await publish_heartbeats(connection, ns, [filler, *refused, *refused])

        await wait_for(
            lambda: (
                metric(controller, "modelfleet_heartbeats_invalid_total", {"cause": "models_cap"})
                == 2 * len(refused)
            ),
            what="the heartbeats past the cap refused",
        )
        assert drop_logs(caplog, "models_cap") == 1
        assert len(controller.registry.model_names()) <= cap
        assert not set(greedy) & controller.registry.model_names()
        assert not set(greedy) & controller.routing.known()
        for fill in fillers:
            await wait_routable(controller, fill)  # within the cap: served as usual
        # Let a stats round (and the routing rounds around it) pass, then look at the broker.
        rounds = controller._rounds
        await wait_for(lambda: controller._rounds > rounds, what="a stats round")
        assert await missing_queues(amqp_url, ns, greedy) == len(greedy)
        for name, family in families(controller).items():
            if name.startswith("modelfleet_model_"):
                labels = {s.labels["model"] for s in family.samples}
                assert labels <= {model, *fillers}, name

        assert await client.submit(model, "ok", timeout=5) == "ok"
