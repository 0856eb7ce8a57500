"""Real processes, real faults: SIGKILL, SIGSTOP, the last worker stopping, controller restart."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from modelfleet import Client, NoWorkerError
from tests.conftest import Namespace
from tests.process.conftest import Fleet

pytestmark = pytest.mark.process

SLOW = {"prompt": "one two three four five", "delay": 0.1}  # about 0.5 s a job


async def test_sigkill_worker_holding_jobs_its_jobs_are_answered_by_another(
    ns: Namespace, fleet: Fleet
) -> None:
    model = ns.model()
    fleet.controller()
    victim = fleet.worker(model, concurrency=4)
    fleet.worker(model, concurrency=4)
    await fleet.wait_routable(model, workers=2)
    async with Client(ns.settings(), timeout=30) as client:
        tasks = [asyncio.create_task(client.submit(model, SLOW)) for _ in range(16)]
        await fleet.wait(
            "/v1/workers",
            lambda d: any(w["pid"] == victim.pid and w["in_flight"] > 0 for w in d["workers"]),
            what="the victim to hold jobs",
        )
        os.kill(victim.pid, signal.SIGKILL)
        results = await asyncio.gather(*tasks)
    assert [r["text"] for r in results] == [SLOW["prompt"]] * 16


async def test_sigstopped_worker_leaves_within_timeout_plus_one_sweep(
    ns: Namespace, fleet: Fleet
) -> None:
    model = ns.model()
    settings = ns.settings()
    fleet.controller()
    frozen = fleet.worker(model)
    fleet.worker(model)
    await fleet.wait_routable(model, workers=2)
    os.kill(frozen.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # Its last heartbeat was at most at the SIGSTOP, so it must be gone by timeout + one
        # sweep after it; 0.5 s more covers this test's own polling and HTTP round trips.
        bound = settings.heartbeat.timeout_s + settings.heartbeat.sweep_interval_s + 0.5
        await fleet.wait(
            "/v1/workers",
            lambda d: all(w["pid"] != frozen.pid for w in d["workers"]),
            timeout=bound,
            what="eviction of the stopped worker",
        )
        assert time.monotonic() - stopped_at <= bound
        models = await fleet.get("/v1/models")
        entry = next(m for m in models["models"] if m["name"] == model)
        assert entry["workers"] == 1 and entry["routable"] is True
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    # Resumed, it heartbeats again and rejoins.
    await fleet.wait_routable(model, workers=2)


async def test_last_worker_stopping_fails_new_jobs_fast_and_dead_letters_backlog(
    ns: Namespace, fleet: Fleet
) -> None:
    model = ns.model()
    fleet.controller()
    worker = fleet.worker(model, concurrency=1)
    await fleet.wait_routable(model, workers=1)
    async with Client(ns.settings(), timeout=30) as client:
        running = asyncio.create_task(client.submit(model, SLOW))
        await fleet.wait(
            "/v1/workers",
            lambda d: any(w["in_flight"] == 1 for w in d["workers"]),
            what="the worker to start a job",
        )
        backlog = [asyncio.create_task(client.submit(model, SLOW)) for _ in range(5)]
        await fleet.wait(
            "/v1/models",
            lambda d: any(m["name"] == model and (m["queue_depth"] or 0) >= 5 for m in d["models"]),
            what="the backlog to queue up",
        )
        worker.send_signal(signal.SIGTERM)  # clean stop: finishes its job, takes no more
        assert (await running)["text"] == SLOW["prompt"]
        outcomes = await asyncio.gather(*backlog, return_exceptions=True)
        assert all(isinstance(o, NoWorkerError) for o in outcomes), outcomes
        assert worker.wait(timeout=10) == 0
        await fleet.wait(
            "/v1/models",
            lambda d: any(m["name"] == model and not m["routable"] for m in d["models"]),
            what="the model to be unrouted",
        )
        started = time.monotonic()
        with pytest.raises(NoWorkerError) as caught:
            await client.submit(model, SLOW)
        assert time.monotonic() - started < 1.0
        assert caught.value.code == 50005 and caught.value.model == model
    errors = await _error_reasons(ns)
    assert errors.count("no_worker") >= 6


async def test_controller_restart_under_load_no_job_fails(ns: Namespace, fleet: Fleet) -> None:
    model = ns.model()
    controller = fleet.controller()
    fleet.worker(model, concurrency=8)
    fleet.worker(model, concurrency=8)
    await fleet.wait_routable(model, workers=2)
    quick = {"prompt": "a b c", "delay": 0.01}
    failures: list[BaseException] = []
    answered = 0
    stop = asyncio.Event()

    async def producer(client: Client) -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                result = await client.submit(model, quick)
                assert result["text"] == "a b c"
                answered += 1
            except Exception as exc:
                failures.append(exc)

    async with Client(ns.settings(), timeout=30) as client:
        producers = [asyncio.create_task(producer(client)) for _ in range(8)]
        await _wait_answered(lambda: answered, 50)
        controller.send_signal(signal.SIGKILL)
        controller.wait(timeout=10)
        before_restart = answered
        await _wait_answered(lambda: answered, before_restart + 50)  # served with no controller
        fleet.controller()
        await fleet.wait("/healthz", lambda d: d.get("healthy") is True, what="the new controller")
        after_restart = answered
        await _wait_answered(lambda: answered, after_restart + 100)
        stop.set()
        await asyncio.gather(*producers)
    assert failures == []
    models = await fleet.get("/v1/models")
    entry = next(m for m in models["models"] if m["name"] == model)
    assert entry["routable"] and entry["workers"] == 2


async def _wait_answered(count: object, target: int, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while count() < target:  # type: ignore[operator]
        if loop.time() > deadline:
            pytest.fail(f"only {count()} jobs answered, wanted {target}")  # type: ignore[operator]
        await asyncio.sleep(0.05)


async def _error_reasons(ns: Namespace) -> list[str]:
    import aio_pika

    from modelfleet.topology import dead_reason

    connection = await aio_pika.connect(ns.amqp_url)
    reasons = []
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(ns.names.errors, passive=True)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            reasons.append(dead_reason(message.headers))
    finally:
        await connection.close()
    return reasons
