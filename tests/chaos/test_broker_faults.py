"""Broker-wide faults: a memory alarm (every publisher blocked at once) and a broker restart.

They change the broker for every client, so they live with the chaos tests (run serially)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess

import pytest

from modelfleet import Client, Job, Worker
from modelfleet.controller import Controller
from tests.conftest import Namespace
from tests.helpers import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]


def _ctl(*args: str) -> str:
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    return subprocess.run(
        [ctl, *args], check=True, capture_output=True, text=True, timeout=120
    ).stdout


def _watermark() -> str:
    out = _ctl("eval", "application:get_env(rabbit, vm_memory_high_watermark).")
    match = re.search(r"\{ok,\s*(.+)\}", out.strip())
    value = match.group(1) if match else "0.4"
    if value.startswith("{absolute"):
        return re.sub(r"[^0-9]", "", value) or "0.4"
    return value


async def _echo(job: Job) -> object:
    return job.payload


async def test_memory_alarm_does_not_evict_the_fleet(ns: Namespace) -> None:
    model = ns.model()
    settings = ns.settings()
    original = await asyncio.to_thread(_watermark)
    async with Controller(settings) as controller:
        workers = [
            Worker(_echo, [model], settings=settings, install_signal_handlers=False)
            for _ in range(3)
        ]
        for worker in workers:
            await worker.start()
        try:
            await wait_for(lambda: len(controller.registry) == 3, what="three workers")
            await wait_for(lambda: controller.routing.routable(model), what="routable")
            await wait_for(lambda: not controller.listen_only, timeout=5, what="listen window end")
            await asyncio.to_thread(_ctl, "set_vm_memory_high_watermark", "0.0000001")
            try:
                # Heartbeats stop for everyone; the guard must hold evictions.
                await wait_for(
                    lambda: controller.suspect_broker, timeout=20, what="the mass-silence guard"
                )
                silent_since = asyncio.get_running_loop().time()
                await wait_for(
                    lambda: (
                        asyncio.get_running_loop().time() - silent_since
                        > 2 * settings.heartbeat.timeout_s
                    ),
                    what="two timeouts of silence",
                )
                assert len(controller.registry) == 3
                assert controller.routing.routable(model)
            finally:
                await asyncio.to_thread(_ctl, "set_vm_memory_high_watermark", original)
            await wait_for(lambda: not controller.suspect_broker, timeout=20, what="alarm cleared")
            assert len(controller.registry) == 3
            async with Client(settings) as client:
                assert await client.submit(model, {"ok": 1}, timeout=10) == {"ok": 1}
        finally:
            for worker in workers:
                await worker.stop(grace_s=1)


async def test_broker_restart_everything_reconnects_and_resumes(ns: Namespace) -> None:
    model = ns.model()
    settings = ns.settings()
    async with Controller(settings) as controller:
        worker = Worker(_echo, [model], settings=settings, install_signal_handlers=False)
        await worker.start()
        try:
            async with Client(settings) as client:
                await wait_for(lambda: controller.routing.routable(model), what="routable")
                assert await client.submit(model, {"n": 0}, timeout=5) == {"n": 0}
                await asyncio.to_thread(_ctl, "stop_app")
                try:
                    # A submit while the broker is down raises within its timeout, never hangs.
                    started = asyncio.get_running_loop().time()
                    with pytest.raises(Exception) as caught:
                        await client.submit(model, {"n": 1}, timeout=2)
                    assert asyncio.get_running_loop().time() - started < 4
                    assert getattr(caught.value, "code", None) in (50006, 50008)
                finally:
                    await asyncio.to_thread(_ctl, "start_app")
                    await asyncio.to_thread(_ctl, "await_startup")
                # Everyone reconnects, re-declares and resumes by themselves.
                result = None
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while result is None and loop.time() < deadline:
                    try:
                        result = await client.submit(model, {"n": 2}, timeout=3)
                    except Exception:
                        await asyncio.sleep(0.3)
                assert result == {"n": 2}
                await wait_for(
                    lambda: (
                        (w := controller.registry.get(worker.worker_id)) is not None
                        and w.age(controller.clock()) < 1
                    ),
                    timeout=15,
                    what="heartbeats after the restart",
                )
        finally:
            await worker.stop(grace_s=1)
