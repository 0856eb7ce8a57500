"""Handlers the benchmark's workers run (``--handler bench.handlers:NAME``).

The worker subprocesses import this module, so they run with the repository root as their
working directory and on ``PYTHONPATH`` (bench/run.py sets both).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from modelfleet.jobs import Job

__all__ = ["STREAM_CHUNKS", "echo", "hold", "stream200"]

STREAM_CHUNKS = 200


async def echo(job: Job) -> Any:
    """The payload back (the same as modelfleet.handlers:echo)."""
    return job.payload


async def stream200(job: Job) -> AsyncIterator[Any]:
    """A stream of 200 small chunks, as fast as the worker can send them."""
    for i in range(STREAM_CHUNKS):
        yield {"i": i}


async def hold(job: Job) -> Any:
    """On its first delivery, hold the job ``payload["hold_s"]`` seconds; on a redelivery (the
    first worker died holding it) answer at once. Says who answered and on which attempt, so the
    failover scenario can tell a killed worker's jobs from the others."""
    if job.attempt == 1:
        await asyncio.sleep(float(job.payload.get("hold_s", 30)))
    return {"pid": os.getpid(), "attempt": job.attempt}
