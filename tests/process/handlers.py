"""Handlers for process tests (importable by `modelfleet worker` subprocesses run from the repo)."""

from __future__ import annotations

import time
from typing import Any

from modelfleet.jobs import Job


def hang(job: Job) -> Any:
    """Never returns in practice: a blocking handler stuck in its thread (a hung GPU call)."""
    time.sleep(3600)
    return None


def poison(job: Job) -> Any:
    """Kills its own worker process when the payload says so (a job that crashes the GPU
    runtime); answers like echo otherwise."""
    import os

    if isinstance(job.payload, dict) and job.payload.get("poison"):
        os._exit(1)
    return job.payload
