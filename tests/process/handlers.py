"""Handlers for process tests (importable by `modelfleet worker` subprocesses run from the repo)."""

from __future__ import annotations

import time
from typing import Any

from modelfleet.jobs import Job


def hang(job: Job) -> Any:
    """Never returns in practice: a blocking handler stuck in its thread (a hung GPU call)."""
    time.sleep(3600)
    return None
