"""Handlers for the chaos soak: every execution is recorded, so the ledger can count duplicates
and tell "never ran" from "ran but the answer was lost".

Each worker process appends to ``$CHAOS_LOG_DIR/executed-{pid}.log``: a line ``{key}`` when an
execution starts, and for a stream a line ``end {key}`` when it stops (done, or cancelled), so
the soak can see which worker is in the middle of a stream (and kill it there). Every chunk of a
stream and its final result carry the execution's nonce (pid + random): a caller that receives
two nonces got a stream spliced from two attempts. The handler never raises.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from modelfleet.jobs import Final, Job

# Chunks of one stream, and the pause before each.
STREAM_CHUNKS = 6
CHUNK_S = 0.15

_LOG: Any = None


def _log() -> Any:
    global _LOG
    if _LOG is None:
        folder = Path(os.environ["CHAOS_LOG_DIR"])
        _LOG = (folder / f"executed-{os.getpid()}.log").open("a", buffering=1)
    return _LOG


async def record(job: Job) -> AsyncIterator[Any]:
    """Note the job's key, take a little while (so workers die holding jobs), answer the key.

    A streamed job yields ``STREAM_CHUNKS`` chunks ``{"k", "i", "n"}`` and ends with
    ``{"k", "n", "chunks"}``; a plain job ends with ``{"k"}`` (an async generator serves both:
    the worker keeps only the ``Final`` value of a job that is not streamed)."""
    key = job.payload["k"]
    work = job.payload.get("work", 0.02)
    _log().write(f"{key}\n")
    if not job.stream:
        await asyncio.sleep(work)
        yield Final({"k": key})
        return
    nonce = f"{os.getpid()}-{secrets.token_hex(4)}"
    pause = job.payload.get("chunk_s", CHUNK_S)
    try:
        for index in range(STREAM_CHUNKS):
            await asyncio.sleep(pause)
            yield {"k": key, "i": index, "n": nonce}
    finally:
        _log().write(f"end {key}\n")
    yield Final({"k": key, "n": nonce, "chunks": STREAM_CHUNKS})
