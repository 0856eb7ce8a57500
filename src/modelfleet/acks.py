"""Batched acknowledgements for a worker's deliveries.

Acking each job on its own costs one frame from the worker and, on a quorum queue, one Raft
command (a log entry) in the broker. :class:`AckBatcher` instead collects the jobs finished in one
turn of the event loop and acks them with as few frames as it can: one ``basic.ack`` with
``multiple=True`` covers every finished delivery below the oldest one still running; only jobs
that finished out of order, above a job still running, are acked one by one.

Nothing is acked earlier than before: a job is handed to the batcher only once its answer (or its
error copy) has been published, exactly where it used to be acked, and the ack frame follows the
answer on the same connection. The batch is handed to aiormq on the next turn of the event loop
without waiting for the socket (a coalescing connection then sends it with the frames around it,
within 5 ms); if the process dies before it is sent, the broker redelivers the job, as it would
have had the process died just before a single ack. :meth:`AckBatcher.aclose` writes what is
pending and waits for the socket; :class:`modelfleet.worker.Worker` calls it before it closes its
connection.

:func:`plan_acks` is the pure part (which frames to send), kept apart from the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterable
from typing import Protocol

__all__ = ["AckBatcher", "AckChannel", "plan_acks"]

log = logging.getLogger(__name__)


class AckChannel(Protocol):
    """The part of an AMQP channel (aiormq's ``Channel``) the batcher uses."""

    def basic_ack(
        self, delivery_tag: int, multiple: bool = False, wait: bool = True
    ) -> Awaitable[None]:
        """Acknowledge ``delivery_tag`` (and every earlier one on the channel if ``multiple``)."""


def plan_acks(finished: Iterable[int], running: Iterable[int]) -> tuple[int | None, list[int]]:
    """Which acks settle the deliveries ``finished`` without touching any in ``running``.

    Returns ``(upto, singles)``: ack ``upto`` with ``multiple=True`` (None: no such ack), then
    each of ``singles`` on its own. ``upto`` is the highest finished tag below the lowest running
    one; a ``multiple`` ack also covers tags settled earlier, which the broker ignores.
    """
    done = sorted(set(finished))
    if not done:
        return None, []
    lowest_running = min(running, default=None)
    if lowest_running is None:
        return done[-1], []
    below = [tag for tag in done if tag < lowest_running]
    above = [tag for tag in done if tag > lowest_running]
    return (below[-1] if below else None), above


class AckBatcher:
    """Tracks one worker's unsettled deliveries per channel and acks finished ones in batches.

    Call :meth:`delivered` when a delivery arrives, then exactly one of :meth:`ack` (batched) or
    :meth:`settled` (the caller settled it itself: nack, reject).
    """

    def __init__(self) -> None:
        self._unsettled: dict[AckChannel, set[int]] = {}
        self._finished: dict[AckChannel, list[int]] = {}
        self._flushing: asyncio.Task[None] | None = None
        self.frames = 0  # ack frames sent, for tests and benchmarks
        self.acked = 0  # deliveries those frames settled

    @property
    def pending(self) -> int:
        """Finished deliveries whose ack is not written yet."""
        return sum(len(tags) for tags in self._finished.values())

    def delivered(self, channel: AckChannel, tag: int) -> None:
        self._unsettled.setdefault(channel, set()).add(tag)

    def settled(self, channel: AckChannel, tag: int) -> None:
        """The caller settled ``tag`` itself (nack or reject): never cover it with an ack."""
        self._discard(channel, tag)

    def ack(self, channel: AckChannel, tag: int) -> None:
        """Ack ``tag`` with the next batch (on the next turn of the event loop)."""
        self._finished.setdefault(channel, []).append(tag)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(
                self._flush_soon(), name="modelfleet-acks"
            )

    async def flush(self, *, drain: bool = False) -> None:
        """Hand every pending ack to the connection now; with ``drain``, return only once they
        are written to the socket (before a connection is closed)."""
        for channel in list(self._finished):
            finished = self._finished.pop(channel)
            running = self._unsettled.get(channel, set()).difference(finished)
            for tag in finished:
                self._discard(channel, tag)
            upto, singles = plan_acks(finished, running)
            try:
                if upto is not None:
                    await channel.basic_ack(upto, multiple=True, wait=drain)
                    self.frames += 1
                for tag in singles:
                    await channel.basic_ack(tag, wait=drain)
                    self.frames += 1
                self.acked += len(finished)
            except Exception as exc:
                # The channel died: the broker has requeued these jobs already, and its
                # replacement never issued these tags.
                log.info(
                    "%d ack(s) not sent (%s); the broker requeued the jobs", len(finished), exc
                )
                self._unsettled.pop(channel, None)

    async def aclose(self) -> None:
        """Flush and drain (call before closing the connection), after a flush under way."""
        if self._flushing is not None and not self._flushing.done():
            with contextlib.suppress(Exception):
                await self._flushing
        await self.flush(drain=True)

    async def _flush_soon(self) -> None:
        # Started with create_task: the jobs that finish in this turn of the loop join the
        # batch before it runs; acks that arrive while it writes go out in a next round.
        while self._finished:
            await self.flush()

    def _discard(self, channel: AckChannel, tag: int) -> None:
        tags = self._unsettled.get(channel)
        if tags is not None:
            tags.discard(tag)
            if not tags:
                del self._unsettled[channel]
