"""Faults a fleet must survive: a poison job that kills every worker, a hung handler."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from modelfleet import Client, JobTimeoutError, WorkerError
from tests.conftest import Namespace
from tests.process.conftest import Fleet
from tests.process.test_failover import _error_reasons

pytestmark = pytest.mark.process


async def _supervise(
    fleet: Fleet, procs: list[subprocess.Popen[bytes]], model: str, stop: asyncio.Event
) -> int:
    """Restart dead workers, like systemd or Kubernetes would, until ``stop``; then count the
    workers that died since the last look (the fleet can finish within one 50 ms look) and
    return how many died in all."""
    deaths = 0
    while not stop.is_set():
        for i, proc in enumerate(procs):
            if proc.poll() is not None:
                deaths += 1
                procs[i] = fleet.worker(
                    model, handler="tests.process.handlers:poison", concurrency=1
                )
        await asyncio.sleep(0.05)
    return deaths + sum(1 for proc in procs if proc.poll() is not None)


async def test_poison_job_is_dead_lettered_after_the_delivery_limit(
    ns: Namespace, fleet: Fleet
) -> None:
    model = ns.model()
    fleet.env["MODELFLEET_ROUTING__DELIVERY_LIMIT"] = "1"  # dead-letter on the 2nd return
    fleet.controller()
    procs = [
        fleet.worker(model, handler="tests.process.handlers:poison", concurrency=1)
        for _ in range(3)
    ]
    # Three workers: the poison job kills two of them, so one always serves the others.
    await fleet.wait_routable(model, workers=3)
    stop = asyncio.Event()
    supervisor = asyncio.create_task(_supervise(fleet, procs, model, stop))
    try:
        async with Client(ns.settings(), timeout=30) as client:
            poison = asyncio.create_task(client.submit(model, {"poison": True}))
            with pytest.raises(WorkerError) as caught:
                await poison
            assert "delivered" in caught.value.message and caught.value.model == model
            # The fleet keeps serving everything else.
            results = await asyncio.gather(*(client.submit(model, {"n": i}) for i in range(20)))
            assert results == [{"n": i} for i in range(20)]
    finally:
        stop.set()
        deaths = await supervisor
    assert deaths == 2
    assert "delivery_limit" in await _error_reasons(ns)


async def test_hung_handler_is_reported_stuck_and_producer_gets_worker_timeout(
    ns: Namespace, fleet: Fleet
) -> None:
    model = ns.model()
    fleet.env["MODELFLEET_WORKER__STUCK_AFTER_S"] = "0.5"
    fleet.controller()
    worker = fleet.worker(model, handler="tests.process.handlers:hang", concurrency=2)
    await fleet.wait_routable(model, workers=1)
    async with Client(ns.settings(), timeout=2) as client:
        with pytest.raises(JobTimeoutError) as caught:
            await client.submit(model, {"x": 1})
        assert caught.value.code == 50006 and caught.value.model == model
    workers = await fleet.wait(
        "/v1/workers",
        lambda d: any(w["pid"] == worker.pid and w["stuck"] for w in d["workers"]),
        what="the worker to be reported stuck",
    )
    entry = next(w for w in workers["workers"] if w["pid"] == worker.pid)
    assert entry["in_flight"] == 1 and entry["oldest_job_age_s"] >= 0.5
    metrics = await fleet.get_text("/metrics")
    assert f'modelfleet_worker_stuck_jobs{{worker="{entry["worker_id"]}"}} 1.0' in metrics
