"""What a handler receives (:class:`Job`) and how it ends a stream (:class:`Final`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from modelfleet.errors import InvalidJobError

__all__ = ["Final", "Job"]


@dataclass(frozen=True)
class Job:
    """One inference job, as a handler sees it.

    ``payload`` is whatever the producer sent (decoded JSON). ``deadline`` is the producer's
    deadline in epoch seconds (``None``: no deadline); a handler that can stop early should
    check :meth:`remaining`.
    """

    job_id: str
    model: str
    payload: Any
    deadline: float | None
    stream: bool
    # 1 on first delivery; higher when an earlier worker died holding this job.
    attempt: int = 1
    # Wall-clock publish time (epoch seconds), when the producer sent it.
    sent_at: float | None = None

    def remaining(self) -> float | None:
        """Seconds left before the producer gives up, or ``None``."""
        return None if self.deadline is None else self.deadline - time.time()

    def invalid(self, message: str) -> InvalidJobError:
        """An error to raise when the payload is unusable: the producer gets INVALID_JOB."""
        return InvalidJobError(message, model=self.model, job_id=self.job_id)


@dataclass(frozen=True)
class Final:
    """Yield ``Final(value)`` from a streaming handler to end the stream with ``value`` as the
    job's result (an async generator cannot ``return`` a value)."""

    value: Any
