"""Is a controller there? The fast answer for a namespace that no controller serves.

A job goes to its model's queue only while a controller has bound that queue; any other job goes
to ``{ns}.unroutable``, where a controller answers it (``NO_WORKER`` at once, or routes it on).
With no controller at all (a wrong namespace, a controller that is not running) nobody answers
and the producer would wait for its whole deadline. So the client looks:

* Does anyone consume ``{ns}.unroutable``? Every running controller does. The look is a passive
  queue declaration (no permission needed beyond the connection's vhost): once at connect, then
  once a second in the background (:class:`QueueLooks`), so an absence is known from when it
  began. A job is failed only on looks taken at that moment, never on a cached one.
* A controller is *gone* (:class:`ControllerWatch`) when the looks find none and this client
  never saw one, or has missed it for ``remember_s`` (a controller restarting, or everyone
  reconnecting after a broker restart, is given that long to come back).
* Gone, and no worker consumes the job's model queue either: nothing can answer the job, which
  fails at once with ``NO_WORKER`` and a message naming the namespace (:func:`no_controller_text`).
* Not there (gone or not yet): the job is published one at a time, with the message count of
  ``{ns}.unroutable`` looked at before and after. A rise means the job went there (its queue is
  not bound): it is *stranded*, and fails with ``NO_WORKER`` (:func:`stranded_text`) at once if
  the controller is gone, or when the grace ends without one coming back; a controller that comes
  back within it answers the job itself.

The policies are pure (:class:`ControllerWatch`, the texts); :class:`QueueLooks` is the I/O, and
:class:`modelfleet.Client` acts on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from modelfleet.topology import Names

__all__ = [
    "ControllerWatch",
    "Look",
    "QueueLooks",
    "no_controller_text",
    "stranded_text",
    "unserved_worker_text",
]

log = logging.getLogger(__name__)

# A look is reused this long: one passive declaration per queue per second at most.
LOOK_MAX_AGE_S = 1.0
# A look that takes longer than this is given up (unknown): the job is then published as usual.
LOOK_TIMEOUT_S = 2.0


@dataclass
class ControllerWatch:
    """Whether ``{ns}.unroutable`` has lost its controllers for good (pure).

    ``remember_s``: a client that has seen a controller gives it this long from the first look
    that misses it (a controller restarting, everyone reconnecting after a broker restart)
    before its absence fails jobs. A client that never saw one does not wait.
    """

    remember_s: float
    ever_seen: bool = False  # some look found a consumer
    absent_since: float | None = None  # the first look of the current absence

    def saw(self, consumers: int | None, now: float) -> None:
        """Note a look: the consumer count of ``{ns}.unroutable``, None if it does not exist."""
        if consumers:
            self.ever_seen = True
            self.absent_since = None
        elif self.absent_since is None:
            self.absent_since = now

    def absent_for(self, now: float) -> float:
        """How long the looks have found no controller (0 while one is there)."""
        return 0.0 if self.absent_since is None else now - self.absent_since

    def gone(self, now: float) -> bool:
        """No controller now, and either none was ever seen or none for ``remember_s``."""
        if self.absent_since is None:
            return False
        return not self.ever_seen or now - self.absent_since > self.remember_s


def no_controller_text(names: Names, model: str, *, unroutable_exists: bool) -> str:
    """The NO_WORKER message for a job that nothing in its namespace can answer."""
    where = (
        f"queue {names.unroutable!r} does not exist"
        if not unroutable_exists
        else f"nothing consumes {names.unroutable!r}"
    )
    return (
        f"no controller serves namespace {names.ns!r} ({where}) and no worker consumes "
        f"{names.model_queue(model)!r}: is the namespace right (setting `namespace`, "
        f"MODELFLEET_NAMESPACE, --namespace)? Start `modelfleet controller` and a worker for "
        f"{model!r} in it"
    )


def unserved_worker_text(names: Names, models: list[str], absent_s: float) -> str:
    """The worker's warning when no controller has consumed ``{ns}.unroutable`` for a while."""
    return (
        f"no controller serves namespace {names.ns!r}: nothing has consumed "
        f"{names.unroutable!r} for {absent_s:.0f}s, so no controller binds the queue(s) of "
        f"{', '.join(models)} (a binding left by an earlier controller still serves; jobs for an "
        "unbound queue get no answer); start `modelfleet controller` with namespace "
        f"{names.ns!r}, or check this worker's namespace (setting `namespace`, "
        "MODELFLEET_NAMESPACE, --namespace)"
    )


def stranded_text(names: Names, model: str) -> str:
    """The NO_WORKER message for a job that went to ``{ns}.unroutable`` with no controller."""
    return (
        f"no controller serves namespace {names.ns!r} (nothing consumes {names.unroutable!r}) "
        f"and no controller has bound the queue of {model!r}: the job went to "
        f"{names.unroutable!r}, where only a controller answers, and was cancelled; start "
        f"`modelfleet controller` in namespace {names.ns!r}"
    )


Unsure = Literal["unsure"]
UNSURE: Unsure = "unsure"  # a look that failed or took too long


class Look(NamedTuple):
    """What a passive declaration of a queue tells."""

    consumers: int
    messages: int


class QueueLooks:
    """Consumer and message counts of queues by passive declaration, each reused for
    ``max_age_s`` (I/O).

    One plain channel, opened on demand (a look at a missing queue closes it: NOT_FOUND). A look
    that fails or takes too long answers :data:`UNKNOWN`; concurrent looks at one queue share
    one declaration.
    """

    UNKNOWN = -1

    def __init__(
        self,
        connection: AbstractConnection,
        *,
        max_age_s: float = LOOK_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connection = connection
        self._max_age_s = max_age_s
        self._clock = clock
        self._channel: AbstractChannel | None = None
        self._seen: dict[str, tuple[float, Look | None]] = {}
        self._inflight: dict[str, asyncio.Future[Look | Unsure | None]] = {}

    async def consumers(self, queue: str, *, fresh: bool = False) -> int | None:
        """The consumer count of ``queue``; None if it does not exist; UNKNOWN if unsure.
        ``fresh``: look now, whatever an earlier look found (before acting on an absence)."""
        look = await self.look(queue, fresh=fresh)
        if look == UNSURE:
            return self.UNKNOWN
        return None if look is None else look.consumers

    async def messages(self, queue: str, *, fresh: bool = False) -> int:
        """The message count of ``queue``; UNKNOWN if missing or unsure."""
        look = await self.look(queue, fresh=fresh)
        return look.messages if isinstance(look, Look) else self.UNKNOWN

    async def look(self, queue: str, *, fresh: bool = False) -> Look | Unsure | None:
        """The counts of ``queue``; None if it does not exist; UNSURE if the look failed."""
        seen = self._seen.get(queue)
        if not fresh and seen is not None and self._clock() - seen[0] < self._max_age_s:
            return seen[1]
        inflight = self._inflight.get(queue)
        if inflight is not None:
            return await asyncio.shield(inflight)
        future: asyncio.Future[Look | Unsure | None] = asyncio.get_running_loop().create_future()
        self._inflight[queue] = future
        result: Look | Unsure | None = UNSURE
        try:
            result = await self._look(queue)
        finally:
            del self._inflight[queue]
            future.set_result(result)  # also when cancelled: the others get "unsure"
        if not isinstance(result, str):
            self._seen[queue] = (self._clock(), result)
            if len(self._seen) > 1024:  # one entry per model looked at: keep it bounded
                self._seen.pop(next(iter(self._seen)))
        return result

    async def _look(self, queue: str) -> Look | Unsure | None:
        try:
            async with asyncio.timeout(LOOK_TIMEOUT_S):
                channel = self._channel
                if channel is None or channel.is_closed:
                    channel = aio_pika.Channel(self._connection, publisher_confirms=False)
                    await channel.initialize()
                    self._channel = channel
                try:
                    declared = await channel.declare_queue(queue, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    return None
                result = declared.declaration_result
                return Look(int(result.consumer_count or 0), int(result.message_count or 0))
        except Exception as exc:  # the connection is down or the broker refused: not sure
            log.debug("could not look at queue %s: %s", queue, exc)
            return UNSURE

    async def aclose(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()
