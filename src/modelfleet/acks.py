"""Batched acknowledgements for a worker's deliveries, and the nacks and rejects between them.

Acking each job on its own costs one frame from the worker and, on a quorum queue, one Raft
command (a log entry) in the broker. :class:`AckBatcher` instead collects the jobs finished in one
turn of the event loop and acks them with as few frames as it can: one ``basic.ack`` with
``multiple=True`` covers every finished delivery below the oldest one still unsettled; only jobs
that finished out of order, above a job still unsettled, are acked one by one.

A ``multiple`` ack must never cover a delivery that is running or being handed back. Two rules
make that hold in any interleaving:

* a delivery stays *unsettled* (so no plan covers it) until the frame that settles it — its
  nack, its reject, or the ack planned for it — has been handed to aiormq. A nack or reject
  cancelled before aiormq queued its frame (its write queue holds 10 frames; a full one makes
  the call wait) leaves the delivery unsettled: the frame was not sent, and a multiple ack must
  not cover it. With ``wait=False`` aiormq's only await is the put into that queue, so a call
  that returns has queued its frame and one that raises has not;
* each delivery is settled once: a nack, reject or ack of a delivery already settled (or
  already planned for an ack) sends nothing, so a retry on a cancel path never reaches the
  broker as a second settlement of one tag (which it refuses with "unknown delivery tag",
  closing the channel);
* every settling frame goes through the batcher under one lock, so the frames of one channel
  enter aiormq's write queue in the order they were planned (a bounded ``asyncio.Queue`` does
  not keep concurrent blocked writers in order on its own).

A nack therefore always reaches the broker before any multiple ack planned after the nack was
decided, and a multiple ack planned before it never covered it.

Nothing is acked earlier than before: a job is handed to the batcher only once its answer (or its
error copy) has been published, and the ack frame follows the answer on the same connection. The
batch is handed to aiormq on the next turn of the event loop without waiting for the socket (a
coalescing connection then sends it with the frames around it, within 5 ms); if the process dies
before it is sent, the broker redelivers the job, as it would have had the process died just
before a single ack. :meth:`AckBatcher.aclose` writes what is pending and waits for the socket;
:class:`modelfleet.worker.Worker` calls it before it closes its connection.

Deliveries of a channel that has closed are forgotten (the broker requeued them with the
channel), so a worker that reconnects many times keeps no dead channels.

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

    @property
    def is_closed(self) -> bool:
        """True once the channel is closed (its unsettled deliveries went back to the queue)."""

    def basic_ack(
        self, delivery_tag: int, multiple: bool = False, wait: bool = True
    ) -> Awaitable[None]:
        """Acknowledge ``delivery_tag`` (and every earlier one on the channel if ``multiple``)."""

    def basic_nack(
        self, delivery_tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True
    ) -> Awaitable[None]:
        """Hand ``delivery_tag`` back (``requeue``) or dead-letter it."""

    def basic_reject(
        self, delivery_tag: int, *, requeue: bool = True, wait: bool = True
    ) -> Awaitable[None]:
        """Refuse ``delivery_tag``: back to the queue (``requeue``) or dead-lettered."""


def plan_acks(finished: Iterable[int], running: Iterable[int]) -> tuple[int | None, list[int]]:
    """Which acks settle the deliveries ``finished`` without touching any in ``running``.

    Returns ``(upto, singles)``: ack ``upto`` with ``multiple=True`` (None: no such ack), then
    each of ``singles`` on its own. ``upto`` is the highest finished tag below the lowest running
    one; a ``multiple`` ack also covers tags settled earlier, which the broker ignores.
    ``running`` must hold every delivery not yet settled by a frame already handed to aiormq
    (running, waiting, or being handed back).
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
    """Tracks one worker's unsettled deliveries per channel and settles them in order.

    Call :meth:`delivered` when a delivery arrives, then exactly one of :meth:`ack` (batched),
    :meth:`nack` or :meth:`reject` (written at once, in order with the batches).
    """

    def __init__(self) -> None:
        self._unsettled: dict[AckChannel, set[int]] = {}
        self._finished: dict[AckChannel, list[int]] = {}
        self._flushing: asyncio.Task[None] | None = None
        # Held while settling frames are planned and handed to aiormq: see the module docstring.
        self._writing = asyncio.Lock()
        self.frames = 0  # ack frames sent, for tests and benchmarks
        self.acked = 0  # deliveries those frames settled

    @property
    def pending(self) -> int:
        """Finished deliveries whose ack is not written yet."""
        return sum(len(tags) for tags in self._finished.values())

    @property
    def channels(self) -> int:
        """Channels tracked (a closed one is forgotten at the next flush or new channel)."""
        return len(self._unsettled.keys() | self._finished.keys())

    def unsettled(self, channel: AckChannel) -> int:
        """Deliveries of ``channel`` not settled yet (running, waiting, or acked but not
        written)."""
        return len(self._unsettled.get(channel, ()))

    def delivered(self, channel: AckChannel, tag: int) -> None:
        tags = self._unsettled.get(channel)
        if tags is None:
            # A new channel (first delivery, or a reopened one): forget the closed ones.
            self._prune()
            tags = self._unsettled[channel] = set()
        tags.add(tag)

    def ack(self, channel: AckChannel, tag: int) -> None:
        """Ack ``tag`` with the next batch (on the next turn of the event loop)."""
        if tag not in self._unsettled.get(channel, ()):
            return  # settled already (or its channel is gone): once only
        self._finished.setdefault(channel, []).append(tag)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(
                self._flush_soon(), name="modelfleet-acks"
            )

    async def nack(self, channel: AckChannel, tag: int, *, requeue: bool = True) -> None:
        """Hand ``tag`` back to its queue (``requeue``) now. Raises if the channel is closed
        (the broker then requeued the delivery itself)."""
        async with self._writing:
            if not self._settling(channel, tag):
                return
            try:
                await channel.basic_nack(tag, requeue=requeue, wait=False)
            except BaseException:
                if channel.is_closed:
                    self._discard(channel, tag)  # the broker requeued it with the channel
                raise  # not queued (cancelled while the write queue was full): still unsettled
            self._discard(channel, tag)  # queued: only now may a multiple ack cover it

    async def reject(self, channel: AckChannel, tag: int) -> None:
        """Dead-letter ``tag`` through its queue's dead-letter exchange (no requeue)."""
        async with self._writing:
            if not self._settling(channel, tag):
                return
            try:
                await channel.basic_reject(tag, requeue=False, wait=False)
            except BaseException:
                if channel.is_closed:
                    self._discard(channel, tag)
                raise
            self._discard(channel, tag)

    async def flush(self, *, drain: bool = False) -> None:
        """Hand every pending ack to the connection now; with ``drain``, return only once they
        are written to the socket (before a connection is closed)."""
        async with self._writing:
            for channel in list(self._finished):
                finished = self._finished.pop(channel)
                running = self._unsettled.get(channel, set()).difference(finished)
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
                    continue
                for tag in finished:
                    self._discard(channel, tag)
            self._prune()

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Flush and drain (call before closing the connection), after a flush under way; at
        most ``timeout_s`` (a connection that does not drain must not hold a stop forever;
        what is not written is redelivered by the broker)."""
        try:
            async with asyncio.timeout(timeout_s):
                if self._flushing is not None and not self._flushing.done():
                    with contextlib.suppress(Exception):
                        await self._flushing
                await self.flush(drain=True)
        except TimeoutError:
            log.warning(
                "acks not written within %.1fs; the broker redelivers those jobs", timeout_s
            )

    async def _flush_soon(self) -> None:
        # Started with create_task: the jobs that finish in this turn of the loop join the
        # batch before it runs; acks that arrive while it writes go out in a next round.
        while self._finished:
            await self.flush()

    def _settling(self, channel: AckChannel, tag: int) -> bool:
        """May a nack or reject of ``tag`` be sent: unsettled, and no ack planned for it."""
        if tag not in self._unsettled.get(channel, ()):
            return False
        return tag not in self._finished.get(channel, ())

    def _prune(self) -> None:
        for channel in [c for c in self._unsettled if c.is_closed]:
            del self._unsettled[channel]

    def _discard(self, channel: AckChannel, tag: int) -> None:
        tags = self._unsettled.get(channel)
        if tags is not None:
            tags.discard(tag)
