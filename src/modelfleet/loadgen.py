"""``modelfleet loadgen``: a steady stream of jobs, so dashboards and experiments have data.

Sends ``fake_llm``-shaped jobs (``{"prompt": ..., "delay": ...}``) at a fixed rate, a share of them
streamed, and prints a progress line every few seconds: sent, answered, failed by error name.
It never lets more than ``max_in_flight`` jobs wait at once, so a dead fleet cannot make it grow
without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from dataclasses import dataclass

from modelfleet.client import Client
from modelfleet.config import Settings
from modelfleet.errors import JobError, ModelfleetError

__all__ = ["LoadReport", "run_load"]


@dataclass
class LoadReport:
    sent: int = 0
    ok: int = 0
    failed: Counter[str] | None = None

    def line(self, elapsed_s: float) -> str:
        failed = self.failed or Counter()
        errors = ", ".join(f"{name} {count}" for name, count in sorted(failed.items())) or "none"
        rate = self.ok / elapsed_s if elapsed_s > 0 else 0.0
        return (
            f"loadgen: {elapsed_s:6.1f}s sent {self.sent} ok {self.ok} ({rate:.1f}/s) "
            f"failed: {errors}"
        )


async def run_load(
    settings: Settings,
    *,
    model: str,
    rate: float,
    duration_s: float | None,
    stream_share: float = 0.2,
    prompt: str = "the quick brown fox jumps over the lazy dog",
    delay_s: float = 0.01,
    max_in_flight: int = 256,
    report_every_s: float = 5.0,
) -> LoadReport:
    """Send jobs at ``rate`` per second for ``duration_s`` (None: until SIGINT/SIGTERM)."""
    report = LoadReport(failed=Counter())
    assert report.failed is not None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    slots = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()
    payload = {"prompt": prompt, "delay": delay_s}

    async def one(client: Client, streamed: bool) -> None:
        try:
            if streamed:
                async for _ in client.stream(model, payload):
                    pass
            else:
                await client.submit(model, payload)
            report.ok += 1
        except JobError as exc:
            report.failed[exc.code.name] += 1  # type: ignore[index]
        except ModelfleetError as exc:
            report.failed[type(exc).__name__] += 1  # type: ignore[index]
        finally:
            slots.release()

    started = time.monotonic()
    next_report = started + report_every_s
    interval = 1.0 / rate
    stream_every = round(1 / stream_share) if stream_share > 0 else 0
    async with Client(settings) as client:
        while not stop.is_set():
            now = time.monotonic()
            if duration_s is not None and now - started >= duration_s:
                break
            await slots.acquire()
            streamed = bool(stream_every) and report.sent % stream_every == 0
            task = asyncio.create_task(one(client, streamed))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            report.sent += 1
            if now >= next_report:
                print(report.line(now - started), flush=True)
                next_report = now + report_every_s
            # Pace by the schedule, not by the last send, so the rate holds on average.
            wait = started + report.sent * interval - time.monotonic()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=wait)
        if tasks:
            await asyncio.wait(tasks, timeout=settings.client.timeout_s)
    print(report.line(time.monotonic() - started), flush=True)
    return report
