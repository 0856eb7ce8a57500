"""Handlers for the chaos soak: every execution is recorded, so the ledger can count duplicates
and tell "never ran" from "ran but the answer was lost"."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from modelfleet.jobs import Job

_LOG: Any = None


def _log() -> Any:
    global _LOG
    if _LOG is None:
        folder = Path(os.environ["CHAOS_LOG_DIR"])
        _LOG = (folder / f"executed-{os.getpid()}.log").open("a", buffering=1)
    return _LOG


async def record(job: Job) -> Any:
    """Note the job's key, take a little while (so workers die holding jobs), answer the key."""
    key = job.payload["k"]
    _log().write(f"{key}\n")
    await asyncio.sleep(job.payload.get("work", 0.02))
    return {"k": key}
