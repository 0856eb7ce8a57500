"""Operator-facing commands and behaviours: status --watch, loadgen, a stuck worker's exit."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys

import pytest

from modelfleet import Client, NoWorkerError
from tests.conftest import Namespace
from tests.process.conftest import Fleet

pytestmark = pytest.mark.process


def _metric(text: str, name: str, labels: str = "") -> float | None:
    pattern = re.escape(name) + (r"\{" + labels + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


async def test_status_watch_refreshes_until_interrupted(ns: Namespace, fleet: Fleet) -> None:
    model = ns.model()
    fleet.controller()
    fleet.worker(model)
    await fleet.wait_routable(model, workers=1)
    watch = subprocess.Popen(  # noqa: ASYNC220 - a long-lived child we read from a thread
        [sys.executable, "-m", "modelfleet", "status", "--watch", "--interval", "0.2"],
        env=fleet.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Wait (bounded) for three redraws to reach stdout, then interrupt like a user would.
        frames = 0
        lines: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        assert watch.stdout is not None
        while frames < 3 and loop.time() < deadline:
            line = await asyncio.to_thread(watch.stdout.readline)
            lines.append(line)
            frames += line.startswith("modelfleet status")
        assert frames >= 3, "".join(lines)
        watch.send_signal(signal.SIGINT)
        await asyncio.to_thread(watch.communicate, timeout=10)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0
    assert any(line.startswith(model) for line in lines)


async def test_loadgen_sends_at_its_rate_and_reports(ns: Namespace, fleet: Fleet) -> None:
    model = ns.model()
    fleet.controller()
    fleet.worker(model, concurrency=8)
    await fleet.wait_routable(model, workers=1)
    done = await asyncio.to_thread(
        fleet.run_cli, "loadgen", "--model", model, "--rate", "40", "--duration", "2", timeout=60
    )
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    sent = int(re.search(r"sent (\d+)", last).group(1))  # type: ignore[union-attr]
    ok = int(re.search(r"ok (\d+)", last).group(1))  # type: ignore[union-attr]
    assert 60 <= sent <= 90 and ok == sent and "failed: none" in last


async def test_worker_with_a_stuck_job_exits_and_the_job_is_not_lost(
    ns: Namespace, fleet: Fleet
) -> None:
    model = ns.model()
    fleet.env["MODELFLEET_WORKER__STUCK_EXIT_S"] = "1"
    fleet.controller()
    worker = fleet.worker(model, handler="tests.process.handlers:hang", concurrency=1)
    await fleet.wait_routable(model, workers=1)
    async with Client(ns.settings(), timeout=20) as client:
        job = asyncio.create_task(client.submit(model, {"x": 1}))
        code = await asyncio.to_thread(worker.wait, 15)
        assert code == 75  # EX_TEMPFAIL: restart me
        # The broker requeued the job it held; with no worker left it fails clearly, not silently.
        with pytest.raises(NoWorkerError):
            await job
    text = await fleet.get_text("/metrics")
    assert _metric(text, "modelfleet_evictions_total", 'reason="stuck"') == 1.0
