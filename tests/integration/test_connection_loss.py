"""Connection loss: the broker drops a process's connection (as in a broker restart or a network
cut) and modelfleet recovers by itself; nothing waits past its deadline."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time

import pytest

from modelfleet import ConnectionLostError, Job
from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.integration.support import fleet


def _rabbitmqctl() -> str:
    path = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    if not os.path.exists(path):
        pytest.fail("these tests force-close connections with rabbitmqctl; install rabbitmq-server")
    return path


def force_close(role: str) -> int:
    """Close, from the broker's side, this process's connections of one role."""
    name = f"modelfleet-{role}@{socket.gethostname()}:{os.getpid()}"
    ctl = _rabbitmqctl()
    listing = subprocess.run(
        [ctl, "list_connections", "pid", "client_properties", "-q"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    pids = [line.split("\t")[0] for line in listing.splitlines() if f'"{name}"' in line]
    for pid in pids:
        subprocess.run(
            [ctl, "close_connection", pid, "test: connection lost"], check=True, timeout=30
        )
    return len(pids)


async def _slow(job: Job) -> dict[str, int]:
    await asyncio.sleep(job.payload.get("sleep", 0))
    return {"n": job.payload["n"]}


async def test_producer_connection_lost_fails_pending_jobs_at_once_then_recovers(
    ns: Namespace,
) -> None:
    model = ns.model()
    async with fleet(ns.settings(), _slow, model) as f:
        # Long enough that the answer cannot beat rabbitmqctl (slow to start on a busy machine).
        pending = asyncio.create_task(f.client.submit(model, {"n": 1, "sleep": 15}, timeout=30))
        await wait_for(lambda: f.worker.in_flight == 1, what="the job to start")
        assert await asyncio.to_thread(force_close, "client") == 1
        started = time.monotonic()
        with pytest.raises(ConnectionLostError) as caught:
            await pending
        assert time.monotonic() - started < 5  # at once, not at the 30 s deadline
        assert caught.value.code == 50008 and caught.value.model == model
        # The robust connection comes back by itself, and the same client works again.
        result = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while result is None and loop.time() < deadline:
            try:
                result = await f.client.submit(model, {"n": 2}, timeout=3)
            except Exception:
                await asyncio.sleep(0.2)
        assert result == {"n": 2}


async def test_worker_connection_lost_it_reconnects_and_its_job_is_still_answered(
    ns: Namespace,
) -> None:
    model = ns.model()
    async with fleet(ns.settings(), _slow, model) as f:
        pending = asyncio.create_task(f.client.submit(model, {"n": 1, "sleep": 1}, timeout=30))
        await wait_for(lambda: f.worker.in_flight == 1, what="the job to start")
        assert await asyncio.to_thread(force_close, "worker") == 1
        # The broker requeued the job when the connection died; the worker comes back, consumes
        # again and answers (once or twice: at-least-once; the client takes the first).
        assert await pending == {"n": 1}
        results = await asyncio.gather(
            *(f.client.submit(model, {"n": i}, timeout=20) for i in range(10))
        )
        assert results == [{"n": i} for i in range(10)]
        # Heartbeats flow again after the reconnect.
        seq = f.controller.registry.get(f.worker.worker_id)
        assert seq is not None
        before = seq.seq
        await wait_for(
            lambda: (
                (w := f.controller.registry.get(f.worker.worker_id)) is not None
                and w.seq > before + 2
            ),
            what="heartbeats after the reconnect",
        )


async def test_controller_connection_lost_it_reconnects_and_keeps_routing(ns: Namespace) -> None:
    model = ns.model()
    async with fleet(ns.settings(), _slow, model) as f:
        assert await asyncio.to_thread(force_close, "controller") == 1
        # Heartbeats are consumed again on the re-declared controller queue...
        count = f.controller.metrics.heartbeats._value.get()
        await wait_for(
            lambda: f.controller.metrics.heartbeats._value.get() > count + 3,
            timeout=15,
            what="heartbeats after the controller reconnected",
        )
        # ...and the no-worker path answers again.
        from modelfleet import NoWorkerError

        ghost = ns.model("ghost")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        outcome: BaseException | None = None
        while loop.time() < deadline:
            try:
                await f.client.submit(ghost, {"n": 0}, timeout=2)
            except NoWorkerError as exc:
                outcome = exc
                break
            except Exception:
                await asyncio.sleep(0.2)
        assert isinstance(outcome, NoWorkerError)
        assert await f.client.submit(model, {"n": 5}) == {"n": 5}


async def test_publish_right_after_a_connection_loss_goes_out_once_reconnected(
    ns: Namespace,
) -> None:
    """A submit while the client's connection is down neither hangs nor fails: it is published
    when the robust connection is back, within the caller's timeout."""
    model = ns.model()
    async with fleet(ns.settings(), _slow, model) as f:
        await asyncio.to_thread(force_close, "client")
        started = time.monotonic()
        assert await f.client.submit(model, {"n": 7}, timeout=8) == {"n": 7}
        assert time.monotonic() - started < 8
