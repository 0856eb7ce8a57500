"""Why a worker's queue stays unbound: the controller tells the worker it refuses.

A controller drops a heartbeat it cannot accept: its sender's AMQP user is not in
``security.heartbeat_users`` (cause ``user``), its models would exceed ``routing.max_models``
(``models_cap``), or its ``started_at`` lies ahead of the controller's clock (``clock``). The
worker behind it would never be routed to, and would not know why. So the controller sends that
worker a notice over ``{ns}.control`` (the fanout every worker consumes for cancels)::

    {"notice": "refused", "worker_id": "...", "cause": "models_cap", "message": "..."}

at most once per worker per :data:`NOTICE_EVERY_S`, and the worker logs it as a warning.

Anyone who may publish to ``{ns}.control`` (a producer, for cancels) can send a notice too, so a
notice only ever makes a worker write a log line: nothing acts on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["NOTICE_EVERY_S", "Notices", "Refusal", "parse_refusal", "refusal_body"]

# A refused worker hears it at most this often (its heartbeats come every interval).
NOTICE_EVERY_S = 30.0
# Bounds: a notice is small, and a flood of forged worker ids cannot grow the controller's memory.
_MAX_BODY = 4096
_MAX_REMEMBERED = 10_000


class Refusal(NamedTuple):
    """A controller's notice that it refuses a worker's heartbeats, and why."""

    worker_id: str
    cause: str
    message: str


def refusal_body(refusal: Refusal) -> bytes:
    return json.dumps(
        {
            "notice": "refused",
            "worker_id": refusal.worker_id,
            "cause": refusal.cause,
            "message": refusal.message,
        }
    ).encode()


def parse_refusal(body: bytes) -> Refusal | None:
    """The refusal in a control message, or None if it is not one."""
    if len(body) > _MAX_BODY:
        return None
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("notice") != "refused":
        return None
    parts = [data.get("worker_id"), data.get("cause"), data.get("message")]
    if not all(isinstance(part, str) and part for part in parts):
        return None
    worker_id, cause, message = (str(part) for part in parts)
    return Refusal(worker_id[:256], cause[:64], message[:1000])


@dataclass
class Notices:
    """Refusals waiting to be sent, at most one per worker per ``every_s`` (pure)."""

    every_s: float = NOTICE_EVERY_S
    pending: dict[str, Refusal] = field(default_factory=dict)
    _sent_at: dict[str, float] = field(default_factory=dict)

    def refuse(self, refusal: Refusal, now: float) -> None:
        """Note a refused heartbeat; it is sent unless this worker heard one lately."""
        last = self._sent_at.get(refusal.worker_id)
        if last is not None and now - last < self.every_s:
            return
        if len(self.pending) < _MAX_REMEMBERED:
            self.pending[refusal.worker_id] = refusal

    def take(self, now: float) -> list[Refusal]:
        """The refusals to send now (each counts as sent)."""
        due = list(self.pending.values())
        self.pending.clear()
        for refusal in due:
            self._sent_at[refusal.worker_id] = now
        if len(self._sent_at) > _MAX_REMEMBERED:
            cutoff = now - self.every_s
            self._sent_at = {k: v for k, v in self._sent_at.items() if v >= cutoff}
        return due
