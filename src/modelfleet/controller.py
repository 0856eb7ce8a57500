"""The controller: the fleet's control plane. Jobs never pass through it.

One asyncio process holds five parts (DESIGN.md's seed components):

* **heartbeat consumer** — its own queue on ``{ns}.heartbeats``; every valid heartbeat goes into
  the :class:`~modelfleet.registry.Registry`; a malformed one is counted, logged once per cause,
  and dropped;
* **sweeper** — every ``heartbeat.sweep_interval_s``: evicts workers silent longer than
  ``heartbeat.timeout_s`` (with the mass-silence guard), then plans routing;
* **binder** — binds a model's queue to ``{ns}.jobs`` while the model has a live worker and
  unbinds it after ``routing.no_worker_grace_s`` without one (:mod:`modelfleet.routing`);
* **no-worker handler** — answers every job in ``{ns}.unroutable``, and the backlog of unbound
  queues, with NO_WORKER, and copies it to ``{ns}.errors`` with reason ``no_worker``;
* **status** — :meth:`models_status` / :meth:`workers_status` for the HTTP API and metrics.

For ``startup_listen_s`` after start it only listens: no evictions, no unbinding. The registry is
soft state, so a restarted controller loses nothing; several controllers may run at once.

Recovery (no zombie): the heartbeat consumer is re-armed (queue re-declared, re-bound, consumed)
after a reconnect, a channel reopen, a consumer cancel by the broker (its queue deleted) and
whenever a periodic check finds it gone, with backoff. The base topology is re-declared every
``REBIND_EVERY_ROUNDS`` stats rounds and right after a NOT_FOUND, and live models re-bound, so a
deleted exchange or queue comes back without a restart. A bind that the broker refuses (a model
queue re-declared with other arguments) closes only the binding channel: that model backs off,
the channel is reopened or replaced, and the other models and NO_WORKER answers go on (those
are published on the no-worker channel). ``/healthz`` is unhealthy while the heartbeat consumer
is gone, the controller's own probe has not come back within the probe window, or a core loop
has ended.

The core loops (sweeper, stats, probe, heartbeat keeper) survive any error of one round,
including the CancelledError aiormq raises in pending RPCs when it drops a stuck connection;
only the controller's stop ends them. Should one end anyway, a CRITICAL line is logged and
:meth:`Controller.run` raises :class:`ControllerFailedError` (``modelfleet controller`` exits 3)
so a supervisor restarts the process. Each round has a deadline (``ROUND_TIMEOUT_S``).
Channels set up and then abandoned (a refused declare, a re-route's bind) are closed for good,
also when aio-pika is restoring them right then (:meth:`Controller._discard`).

Where this module goes below aio-pika's public API, and the tests that cover it, is listed
in :mod:`modelfleet.connections`.

>>> controller = Controller(settings)
>>> await controller.run()   # until SIGTERM/SIGINT
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from secrets import token_hex
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from pydantic import ValidationError

from modelfleet.addressing import is_direct_reply_to
from modelfleet.config import Settings
from modelfleet.connections import connect
from modelfleet.errors import BrokerError, ErrorCode
from modelfleet.messages import ErrorReply, Heartbeat, check_model_name
from modelfleet.metrics import ControllerMetrics, ModelFigures, WorkerFigures, reason_label
from modelfleet.notices import NOTICE_EVERY_S, Notices, Refusal, refusal_body
from modelfleet.registry import (
    EvictionHold,
    EvictionReason,
    Observation,
    Registry,
    started_at_plausible,
)
from modelfleet.routing import ActionKind, RoutingTable
from modelfleet.security import heartbeat_sender_allowed
from modelfleet.stats import FleetStats
from modelfleet.topology import (
    DEADLINE_HEADER,
    MODEL_HEADER,
    DeadReason,
    Names,
    Topology,
    controller_queue_arguments,
    dead_copy,
    dead_reason,
    json_message,
)

__all__ = ["Controller", "ControllerFailedError"]


def _claimed_worker_id(body: bytes) -> str | None:
    """The worker id a heartbeat we drop claims, if it names one (for its refusal notice)."""
    try:
        data = json.loads(body[:MAX_HEARTBEAT_BYTES])
    except (ValueError, UnicodeDecodeError):
        return None
    worker_id = data.get("worker_id") if isinstance(data, dict) else None
    return worker_id[:256] if isinstance(worker_id, str) and worker_id else None


class ControllerFailedError(BrokerError):
    """A core task of the controller ended while it was not stopping: the process exits
    non-zero (``modelfleet controller`` exits 3) so its supervisor restarts it."""


def _valid_model_name(name: object) -> bool:
    try:
        check_model_name(name)
    except ValueError:
        return False
    return True


log = logging.getLogger(__name__)

# A heartbeat is a few hundred bytes; anything far larger is broken or hostile.
MAX_HEARTBEAT_BYTES = 64 * 1024
# A job the no-worker handler re-publishes (its model became live meanwhile) carries this, so it
# is re-routed at most once.
REROUTED_HEADER = "x-mf-rerouted"
# Re-assert bindings of routable models every this many stats rounds (an operator may have
# unbound by hand; another controller may have raced us).
REBIND_EVERY_ROUNDS = 10
# AMQP `type` of the controller's own round-trip probe on the heartbeats exchange.
PROBE_TYPE = "modelfleet.probe"
# How often the heartbeat keeper checks its consumer is there (a cancel or reopen wakes it at
# once; this catches anything that slipped past the callbacks).
CONSUMER_CHECK_S = 1.0
# Backoff of re-arming a consumer and of retrying a model's failed bind/unbind.
BACKOFF_MIN_S = 0.25
BACKOFF_MAX_S = 30.0
# stop(): cancel what still runs this many times, waiting this long each time.
STOP_CANCEL_ROUNDS = 5
STOP_WAIT_S = 2.0
# The heartbeat consumer's backoff stays short: without it the controller is blind.
HB_BACKOFF_MAX_S = 5.0
# A binding channel closed this long (its own reopen failed) is replaced by a new one.
CHANNEL_STUCK_S = 3.0
# A job whose NO_WORKER copy could not be published waits this long before it is handed back,
# so a broken channel does not turn the unroutable queue into a busy loop.
NACK_DELAY_S = 0.5
# One warning per key per this many seconds: a failure that repeats must not flood the log.
LOG_EVERY_S = 60.0
# Upper bound on one stats round, one re-assert round and one re-arm of the heartbeat consumer:
# a robust channel we closed never becomes ready again, and an RPC on a connection that went
# silent waits for aiormq's own heartbeat to notice; a round must never wedge its loop.
ROUND_TIMEOUT_S = 10.0
# Re-routes in flight at once: each opens a throw-away channel, and a burst of jobs that raced
# their model's binding must not open hundreds of channels together.
REROUTE_CONCURRENCY = 4


class Controller:
    """Watches heartbeats and decides which models are routable. See the module docstring.

    Keywords:
        settings: heartbeat, routing, amqp and http settings.
        instance: this controller's id in queue names (default ``host-pid-random``).
        clock: monotonic clock, injectable for tests.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        instance: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or Settings()
        self.instance = instance or f"{socket.gethostname()}-{os.getpid()}-{token_hex(3)}"
        self.names = Names(self.settings.namespace)
        self.topology = Topology(self.names, self.settings.routing, self.settings.heartbeat)
        self.clock = clock
        self.registry = Registry(max_models=self.settings.routing.max_models)
        self.routing = RoutingTable(
            grace_s=self.settings.routing.no_worker_grace_s,
            forget_after_s=self.settings.routing.forget_after_s,
        )
        self.metrics = ControllerMetrics()
        self.fleet_stats = FleetStats(max_models=self.settings.routing.max_models)
        self.started_at: float | None = None
        self.suspect_broker = False
        self._queue_counts: dict[str, tuple[int, int]] = {}
        self._logged_causes: set[str] = set()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._stats_channel: AbstractChannel | None = None
        # Refused heartbeats, told to their workers (modelfleet.notices) on a plain channel
        # of their own: a missing control exchange closes only that one.
        self.notices = Notices()
        self._notice_channel: AbstractChannel | None = None
        self._jobs: AbstractExchange | None = None
        self._dead: AbstractExchange | None = None
        self._hb_channel: AbstractRobustChannel | None = None
        self._hb_underlay: aiormq.Channel | None = None
        self._hb_tag: str | None = None
        self._hb_rearm = asyncio.Event()
        self.hb_rearmed = 0  # times the heartbeat consumer was armed again after the first
        self._nw_channel: AbstractChannel | None = None
        self._nw_dead: AbstractExchange | None = None
        self._unroutable_queue: AbstractQueue | None = None
        self._channel_closed_since: float | None = None
        self._main_replacing = False
        self._base_suspect = False
        self._action_backoff: dict[str, tuple[float, float]] = {}
        self._logged_at: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._drains: dict[str, asyncio.Task[None]] = {}
        self._catalog_written: frozenset[str] | None = None
        self._stop = asyncio.Event()
        self._rounds = 0
        self._kick_pending = False
        self._kick_again = False
        self._probe_seen_at: float | None = None
        # The probe's body: secret and fixed for this process, so nobody who can publish to the
        # heartbeats exchange can forge our probe (the instance id is readable in queue names).
        self._probe_token = token_hex(16).encode()
        self._hold = EvictionHold(self.settings.heartbeat.timeout_s)
        self._core_tasks: list[asyncio.Task[None]] = []
        self._failed = asyncio.Event()
        self._reroute_slots = asyncio.Semaphore(REROUTE_CONCURRENCY)
        self.failure: str | None = None  # why a core task ended, when one did
        self.metrics.attach(self)

    # -- timing --------------------------------------------------------------------------

    @property
    def listen_only(self) -> bool:
        """True during the start-up window: the registry is still filling from heartbeats."""
        if self.started_at is None:
            return True
        return self.clock() - self.started_at < self.settings.startup_listen_s

    def _heard_everyone(self) -> bool:
        """Past one and a half heartbeat intervals, every live worker has spoken to us."""
        if self.started_at is None:
            return False
        return self.clock() - self.started_at >= 1.5 * self.settings.heartbeat.interval_s

    @property
    def heartbeat_consumer_up(self) -> bool:
        """Whether the heartbeat consumer is registered on an open channel."""
        underlay = self._hb_underlay
        return (
            underlay is not None
            and not underlay.is_closed
            and self._hb_tag is not None
            and self._hb_tag in underlay.consumers
        )

    def _connected(self) -> bool:
        """Whether the connection is up now. ``is_closed`` is not enough: a robust connection
        that is reconnecting is not closed, yet has no transport and opens no channel."""
        connection = self._connection
        if connection is None or connection.is_closed or not connection.connected.is_set():
            return False
        transport = connection.transport
        return transport is not None and not transport.connection.is_closed

    @property
    def tasks_alive(self) -> bool:
        """Whether every core loop (sweeper, stats, probe, heartbeat keeper) still runs."""
        return bool(self._core_tasks) and not any(t.done() for t in self._core_tasks)

    def health(self) -> dict[str, Any]:
        """What ``/healthz`` reports; ``healthy`` is False while heartbeats cannot arrive."""
        connected = self._connected()
        now = self.clock()
        probe_age = None if self._probe_seen_at is None else now - self._probe_seen_at
        consuming = self.heartbeat_consumer_up
        probe_ok = self._broker_ok(now)
        alive = self.tasks_alive
        return {
            "healthy": connected and not self.listen_only and consuming and probe_ok and alive,
            "connected": connected,
            "listen_only": self.listen_only,
            "heartbeat_consumer": consuming,
            "probe_age_s": None if probe_age is None else round(probe_age, 3),
            "tasks_alive": alive,
        }

    @property
    def healthy(self) -> bool:
        return bool(self.health()["healthy"])

    def _must_end(self, exc: BaseException) -> bool:
        """Whether a long-lived loop must let ``exc`` end it: the controller is stopping, this
        task itself is being cancelled, or it is not an error (KeyboardInterrupt, SystemExit).
        aiormq fails pending RPCs with CancelledError when it drops a stuck connection: that
        one is an error to survive, not a request to stop."""
        if self._stop.is_set() or not isinstance(exc, (Exception, asyncio.CancelledError)):
            return True
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

    def _warn(self, key: str, text: str, *args: object, exc_info: bool = False) -> None:
        """A warning at most once per LOG_EVERY_S per key."""
        now = time.monotonic()
        last = self._logged_at.get(key)
        if last is not None and now - last < LOG_EVERY_S:
            return
        if len(self._logged_at) > 1_000:  # bounded: keys name models
            self._logged_at.clear()
        self._logged_at[key] = now
        log.warning(text + " (logged once a minute)", *args, exc_info=exc_info)

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._connection = await connect(self.settings.amqp, role="controller")
        await self._open_main_channel()
        self._stats_channel = await self._connection.channel(publisher_confirms=False)
        self.started_at = self.clock()
        await self._read_catalog()

        channel = await self._connection.channel(publisher_confirms=False)
        assert isinstance(channel, AbstractRobustChannel)
        self._hb_channel = channel
        # A channel error reopens the robust channel without our raw consumer: re-arm it.
        channel.reopen_callbacks.add(self._on_hb_channel_reopened)
        await self._arm_heartbeats()
        self._connection.reconnect_callbacks.add(self._on_reconnected)

        # aio-pika consumers: a robust channel restores them after a channel error or a consumer
        # cancel, declaring and binding their queues again (so declared here with their real
        # arguments and binding, never passively).
        tap_channel = await self._connection.channel(publisher_confirms=False)
        tap = await self.topology.declare_dead_tap(tap_channel, self.instance)
        await tap.consume(self._on_dead_letter, no_ack=True)

        nw_channel = await self._connection.channel(publisher_confirms=True)
        await nw_channel.set_qos(prefetch_count=200)
        self._nw_channel = nw_channel
        # NO_WORKER copies and error replies go out on this channel, not on the binding
        # channel a refused bind can close. Not declared (ensure=False): a robust channel would
        # re-declare it passively on reopen and stay closed if it were missing.
        self._nw_dead = await nw_channel.get_exchange(self.names.dead, ensure=False)
        self._unroutable_queue = await self.topology.declare_unroutable_queue(nw_channel)
        await self._unroutable_queue.consume(self._on_unroutable)

        self._core_tasks = [
            asyncio.create_task(self._sweep_loop(), name="modelfleet-sweeper"),
            asyncio.create_task(self._stats_loop(), name="modelfleet-stats"),
            asyncio.create_task(self._probe_loop(), name="modelfleet-probe"),
            asyncio.create_task(self._heartbeat_keeper(), name="modelfleet-heartbeat-keeper"),
        ]
        for task in self._core_tasks:
            task.add_done_callback(self._on_core_task_done)
        self._tasks = list(self._core_tasks)
        log.info(
            "controller %s watching namespace %s (listen-only for %.1fs)",
            self.instance,
            self.names.ns,
            self.settings.startup_listen_s,
        )

    def _on_core_task_done(self, task: asyncio.Task[None]) -> None:
        """A core loop never ends on its own: if one does, a zombie controller (no eviction, no
        routing, frozen depths) is worse than a restart, so make run() exit non-zero."""
        if self._stop.is_set():
            return
        if task.cancelled():
            cause = "cancelled"
        else:
            exc = task.exception()
            cause = "returned" if exc is None else f"{type(exc).__name__}: {exc}"
        self.failure = f"core task {task.get_name()} ended ({cause})"[:500]
        log.critical(
            "controller %s: %s; exiting so a supervisor restarts it", self.instance, self.failure
        )
        self._failed.set()

    async def serve_until(self, stop: asyncio.Event | None = None) -> None:
        """Wait until :meth:`stop` is called, ``stop`` is set, or a core task fails."""
        waiters = [self._stop.wait(), self._failed.wait()]
        if stop is not None:
            waiters.append(stop.wait())
        tasks = [asyncio.ensure_future(w) for w in waiters]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()

    def raise_if_failed(self) -> None:
        """Raise :class:`ControllerFailedError` if a core task ended while running."""
        if self.failure is not None:
            raise ControllerFailedError(f"controller {self.instance}: {self.failure}")

    async def stop(self) -> None:
        self._stop.set()
        tasks = {*self._tasks, *self._drains.values()}
        # A cancel can be swallowed (Python 3.11's wait_for, a loop that survives errors): the
        # loops also end on the stop flag, and a task still running is cancelled again rather
        # than waited for forever.
        for _ in range(STOP_CANCEL_ROUNDS):
            tasks = {task for task in tasks if not task.done()}
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=STOP_WAIT_S)
        for task in tasks:
            if not task.done():
                log.error("controller %s: task %s did not stop", self.instance, task.get_name())
            elif not task.cancelled() and task.exception() is not None:
                log.debug("task %s ended with %r", task.get_name(), task.exception())
        self._tasks.clear()
        self._drains.clear()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None
        log.info("controller %s stopped", self.instance)

    async def __aenter__(self) -> Controller:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        """Start, run until SIGTERM/SIGINT, stop; raise :class:`ControllerFailedError` when a
        core task ended on its own (the process must exit non-zero)."""
        await self.start()
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self._stop.set)
        try:
            await self.serve_until()
        finally:
            await self.stop()
        self.raise_if_failed()

    # -- heartbeats ----------------------------------------------------------------------

    def _drop(self, cause: str, detail: str) -> None:
        self.metrics.heartbeats_invalid.labels(cause).inc()
        if cause not in self._logged_causes:  # once per cause: a flood must not flood the log
            self._logged_causes.add(cause)
            log.warning(
                "dropping invalid heartbeat (%s): %s (logged once per cause)", cause, detail
            )

    def _refuse(self, worker_id: str | None, cause: str, text: str) -> None:
        """Tell the worker (if it named itself) why its heartbeats are dropped."""
        if worker_id:
            self.notices.refuse(Refusal(worker_id, cause, text), self.clock())

    async def _send_notices(self) -> None:
        """Publish the refusals due to ``{ns}.control`` (every worker's control queue)."""
        due = self.notices.take(self.clock())
        if not due or self._connection is None:
            return
        channel = self._notice_channel
        try:
            if channel is None or channel.is_closed:
                channel = aio_pika.Channel(self._connection, publisher_confirms=False)
                await channel.initialize()
                self._notice_channel = channel
            exchange = await channel.get_exchange(self.names.control, ensure=False)
            for refusal in due:
                await exchange.publish(
                    json_message(refusal_body(refusal), expiration=NOTICE_EVERY_S),
                    routing_key="",
                )
        except Exception as exc:  # a notice is only a log line on the worker: never fatal
            self._warn("notices", "cannot tell workers why they are refused (%s)", exc)

    def handle_heartbeat(self, body: bytes) -> Observation | None:
        """Validate and record one heartbeat body (public for tests and benchmarks)."""
        if len(body) > MAX_HEARTBEAT_BYTES:
            self._drop("too_large", f"{len(body)} bytes")
            return None
        try:
            hb = Heartbeat.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            if first["type"] == "json_invalid":
                cause = "not_json"
            elif tuple(first["loc"]) == ("v",):
                cause = "version"
            else:
                cause = "schema"
            where = ".".join(str(p) for p in first["loc"])
            self._drop(cause, f"{where}: {first['msg']}"[:300])
            return None
        wall_now = time.time()
        if not started_at_plausible(hb.started_at, wall_now):
            # A later started_at wins over the live entry: one far in the future would hide
            # the real worker of that id until the clock got there.
            text = f"worker {hb.worker_id}: started_at {hb.started_at} is ahead"
            self._drop("clock", text)
            self._refuse(hb.worker_id, "clock", f"{text} of the controller's clock")
            return None
        if not self._admit_models(hb.models):
            observation = Observation.REFUSED
        else:
            observation = self.registry.observe(hb, now=self.clock(), wall_now=wall_now)
        if observation is Observation.REFUSED:
            text = f"worker {hb.worker_id} would exceed routing.max_models"
            self._drop("models_cap", text)
            self._refuse(
                hb.worker_id,
                "models_cap",
                f"{text} ({self.settings.routing.max_models}): its models {list(hb.models)} "
                "are not routed",
            )
            return observation
        self.metrics.heartbeats.inc()
        lag = wall_now - hb.sent_at
        # sent_at is the worker's wall clock: a heartbeat never waits longer than queue_ttl_s in
        # our queue, so a larger "lag" is a skewed or forged clock and would poison the histogram.
        if lag <= self.settings.heartbeat.queue_ttl_s:
            self.metrics.heartbeat_lag.observe(max(0.0, lag))
        if observation is Observation.RESTARTED:
            # Its counters start again from 0: count them from there, not against the old ones.
            self.fleet_stats.update(hb.worker_id, {})
        if observation is not Observation.IGNORED:
            self.fleet_stats.update(hb.worker_id, hb.stats)
        if observation is Observation.ADDED:
            log.info("worker %s joined: %s", hb.worker_id, ", ".join(hb.models))
        elif observation is Observation.RESTARTED:
            log.info("worker %s restarted: %s", hb.worker_id, ", ".join(hb.models))
        elif observation is Observation.REMOVED:
            if hb.stop_reason == "stuck":
                self.metrics.evictions.labels(EvictionReason.STUCK).inc()
                log.warning(
                    "worker %s left: a job was stuck past worker.stuck_exit_s", hb.worker_id
                )
            else:
                self.metrics.evictions.labels(EvictionReason.STOPPING).inc()
                log.info("worker %s left (stopping)", hb.worker_id)
        if observation in (Observation.ADDED, Observation.REMOVED, Observation.RESTARTED) or (
            observation is Observation.UPDATED and hb.state.value != "ready"
        ):
            # Routing reacts at once to a new model or a clean stop, not at the next sweep.
            self._kick()
        return observation

    def _admit_models(self, models: tuple[str, ...]) -> bool:
        """Keep every model the controller remembers (registry and routing table) under
        ``routing.max_models``: models that come and go cannot add queues and series without
        bound. Room is made by forgetting unbound, workerless models, the longest unbound first."""
        if all(model in self.routing or self.registry.serves(model) for model in models):
            return True  # the common case, in O(models) rather than O(fleet)
        known = self.routing.known() | self.registry.model_names()
        new = set(models) - known
        excess = len(known) + len(new) - self.settings.routing.max_models
        if not new or excess <= 0:
            return True
        freed = self.routing.forget_oldest_unrouted(excess, keep=self.registry.model_names())
        for model in freed:
            self._queue_counts.pop(model, None)
        return len(freed) >= excess

    def _broker_ok(self, now: float) -> bool:
        """Whether this controller's own probe made the round trip through the broker lately
        (a memory alarm or an outage stops it as it stops every worker's heartbeat)."""
        if self._probe_seen_at is None:
            return True  # not probing yet (not started): nothing says otherwise
        allowed = 2 * self.settings.heartbeat.interval_s + self.settings.heartbeat.sweep_interval_s
        return now - self._probe_seen_at <= allowed

    async def _probe_loop(self) -> None:
        """Publish a probe to the heartbeats exchange every interval; _on_heartbeat notes its
        return. Its absence means the data plane, not the workers, has stopped; its return
        after a silent worker's deadline means that worker is really gone (Registry.sweep)."""
        assert self._connection is not None
        interval = self.settings.heartbeat.interval_s
        self._probe_seen_at = self.clock()
        channel: AbstractChannel | None = None
        # Not `while True`: Python 3.11's wait_for can swallow a cancellation that meets the
        # inner task's end, and a loop that survives errors would then run on after stop();
        # the stop flag ends it whatever happened to the cancel.
        while not self._stop.is_set():
            try:
                if channel is not None and channel.is_closed and self._connected():
                    # Publishing to a deleted exchange closes the channel: start a new one
                    # rather than wait on the old one's reopen.
                    await self._discard(channel)
                    channel = None
                if channel is None:
                    channel = await asyncio.wait_for(
                        self._connection.channel(publisher_confirms=False), ROUND_TIMEOUT_S
                    )
                exchange = await channel.get_exchange(self.names.heartbeats, ensure=False)
                probe = aio_pika.Message(
                    self._probe_token, type=PROBE_TYPE, expiration=interval * 2
                )
                await asyncio.wait_for(exchange.publish(probe, "", mandatory=False), interval)
            except BaseException as exc:
                if self._must_end(exc):
                    raise
                log.debug("probe not sent: %r", exc)
            await asyncio.sleep(interval)

    async def _arm_heartbeats(self) -> None:
        """Declare and bind this controller's heartbeat queue and consume it, unless consuming.

        Consumed with aiormq directly: a large fleet's hot path skips aio-pika's per-message
        wrapper (measured: most of the cost of a heartbeat beyond its validation). aio-pika does
        not restore such a consumer, nor re-declare a queue it was not told about: the keeper
        (_heartbeat_keeper) calls this again after a reconnect, a channel reopen or a cancel.
        Declare and bind are idempotent, so this also heals a binding lost with the exchange."""
        assert self._hb_channel is not None
        # aiormq.Channel: its `consumers` tells whether our consumer is still registered.
        underlay = cast(aiormq.Channel, await self._hb_channel.get_underlay_channel())
        queue = self.names.controller_queue(self.instance)
        await underlay.queue_declare(
            queue,
            durable=False,
            auto_delete=True,
            arguments=controller_queue_arguments(self.settings.heartbeat),
        )
        await underlay.queue_bind(queue, self.names.heartbeats)
        # A set: adding the same bound method again is a no-op.
        underlay.on_consumer_cancel_callbacks.add(self._on_hb_consumer_cancelled)
        if self._hb_underlay is underlay and self.heartbeat_consumer_up:
            return
        ok = await underlay.basic_consume(queue, self._on_heartbeat, no_ack=True)
        if self._hb_tag is not None:
            self.hb_rearmed += 1
        self._hb_underlay = underlay
        self._hb_tag = ok.consumer_tag

    def _on_hb_consumer_cancelled(self, frame: object) -> None:
        if getattr(frame, "consumer_tag", None) == self._hb_tag:
            log.warning("the broker cancelled the heartbeat consumer (queue deleted?): re-arming")
            self._hb_rearm.set()

    def _on_hb_channel_reopened(self, *_: object) -> None:
        self._hb_rearm.set()

    def _on_reconnected(self, *_: object) -> None:
        # The fleet reconnects too, and may take longer than we did: give it time to speak.
        self._hold.broker_back(self.clock())
        self._hb_rearm.set()

    async def _heartbeat_keeper(self) -> None:
        """Keep the heartbeat consumer up: re-arm it when told (cancel, reopen, reconnect), when
        a periodic check finds it gone, and when the probe stops coming back (its binding may
        have gone with a deleted exchange); back off while that fails. A reconnect or reopen
        cuts a backoff short."""
        backoff = BACKOFF_MIN_S
        delay = CONSUMER_CHECK_S
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hb_rearm.wait(), delay)
            self._hb_rearm.clear()
            if self.heartbeat_consumer_up and self._broker_ok(self.clock()):
                backoff, delay = BACKOFF_MIN_S, CONSUMER_CHECK_S
                continue
            try:
                was_up = self.heartbeat_consumer_up
                await asyncio.wait_for(self._arm_heartbeats(), ROUND_TIMEOUT_S)
            except BaseException as exc:
                if self._must_end(exc):
                    raise
                if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
                    self._base_suspect = True  # the heartbeats exchange is gone
                self._warn("hb-arm", "heartbeat consumer not armed (%r); retrying", exc)
                try:
                    await asyncio.wait_for(self._replace_if_stuck_hb_channel(), ROUND_TIMEOUT_S)
                except BaseException as again:
                    if self._must_end(again):
                        raise
                    self._warn("hb-channel", "no new heartbeat channel (%r); retrying", again)
                delay, backoff = backoff, min(backoff * 2, HB_BACKOFF_MAX_S)
                continue
            if not was_up:
                log.info("heartbeat consumer armed again")
            if self._broker_ok(self.clock()):
                backoff, delay = BACKOFF_MIN_S, CONSUMER_CHECK_S
            else:
                # Declared and bound again; give the next probe time to come back.
                delay, backoff = backoff, min(backoff * 2, HB_BACKOFF_MAX_S)

    async def _replace_if_stuck_hb_channel(self) -> None:
        """A robust channel whose own reopen failed stays closed: use a new one."""
        channel = self._hb_channel
        if channel is None or not channel.is_closed or self._connection is None:
            return
        if not self._connected():
            return  # the connection's own recovery reopens every channel
        await self._discard(channel)
        fresh = await self._connection.channel(publisher_confirms=False)
        assert isinstance(fresh, AbstractRobustChannel)
        fresh.reopen_callbacks.add(self._on_hb_channel_reopened)
        self._hb_channel = fresh

    async def _on_heartbeat(self, message: aiormq.abc.DeliveredMessage) -> None:
        properties = message.header.properties
        if properties.message_type == PROBE_TYPE:
            if message.body == self._probe_token:
                self._probe_returned()
            return  # another controller's probe (or a forged one): not a heartbeat
        # user_id is checked by the broker (it must be the sender's own user): only the users in
        # security.heartbeat_users (when set) may announce workers.
        user_id = properties.user_id
        if not heartbeat_sender_allowed(user_id, self.settings.security.heartbeat_users):
            sender = "no user_id" if user_id is None else f"user {user_id!r}"
            text = f"heartbeat from {sender[:120]}, not in security.heartbeat_users"
            self._drop("user", text)
            self._refuse(_claimed_worker_id(message.body), "user", text)
            return
        self.handle_heartbeat(message.body)

    def _probe_returned(self) -> None:
        now = self.clock()
        if not self._broker_ok(now):
            # Back after a gap: the workers' heartbeats were stuck in the same outage, and a
            # whole fleet reconnecting may take a while.
            self._hold.broker_back(now)
        self._probe_seen_at = now

    async def _on_dead_letter(self, message: AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        model = headers.get(MODEL_HEADER) or message.routing_key or ""
        if isinstance(model, bytes):
            model = model.decode(errors="replace")
        known = model in self.routing or model in self.registry.model_names()
        label = model if isinstance(model, str) and known else "other"
        reason = dead_reason(headers)
        self.metrics.dead_letters.labels(label, reason_label(reason)).inc()
        if reason == DeadReason.DELIVERY_LIMIT and message.reply_to:
            # Nobody else can tell the producer: every worker that took the job died.
            await self._reply_error(
                message,
                ErrorCode.WORKER_ERROR,
                f"the job was delivered {self.settings.routing.delivery_limit + 1} times and "
                f"every worker that took it died (routing.delivery_limit); it is kept in "
                f"{self.names.errors}",
                model=str(model),
            )

    async def _reply_error(
        self, message: AbstractIncomingMessage, code: ErrorCode, text: str, *, model: str
    ) -> None:
        """Error reply to the job's producer, only at a direct reply-to address: replies go out
        through the default exchange, and any other reply_to would let a producer make the
        controller write into a queue of its choosing (say ``{ns}.catalog``)."""
        job_id = message.message_id or message.correlation_id or "?"
        if not is_direct_reply_to(message.reply_to):
            self.metrics.replies_refused.labels("not_direct_reply_to").inc()
            self._warn(
                "reply-refused",
                "job %s: not replying to reply_to %r: not a direct reply-to address",
                job_id[:100],
                (message.reply_to or "")[:100],
            )
            return
        channel = self._nw_channel or self._channel
        if channel is None:
            return
        reply = ErrorReply.build(code, text, model=model, job_id=job_id)
        with contextlib.suppress(Exception):
            await channel.default_exchange.publish(
                json_message(
                    reply.model_dump_json().encode(),
                    correlation_id=message.correlation_id or job_id,
                    type="error",
                ),
                routing_key=message.reply_to or "",
                mandatory=False,
            )

    # -- sweeper and binder --------------------------------------------------------------

    def _kick(self) -> None:
        """Run a routing round now (a worker joined or left), not at the next sweep.

        One round at a time: kicks that arrive while a round runs ask for exactly one more, so a
        burst of joining workers costs a couple of rounds, not one per worker."""
        if self._channel is None or self._stop.is_set():
            return
        if self._kick_pending:
            self._kick_again = True
            return
        self._kick_pending = True
        task = asyncio.create_task(self._kicked_routing())
        self._tasks.append(task)
        task.add_done_callback(self._forget_task)

    async def _kicked_routing(self) -> None:
        try:
            while True:
                self._kick_again = False
                try:
                    await self._apply_routing()
                except Exception:
                    log.exception("routing round failed; the sweeper retries")
                if not self._kick_again or self._stop.is_set():
                    return
        finally:
            self._kick_pending = False

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        if task in self._tasks:
            self._tasks.remove(task)

    def sweep(self) -> None:
        """Evict silent workers (pure registry work; routing follows in _apply_routing)."""
        started = time.perf_counter()
        hb = self.settings.heartbeat
        now = self.clock()
        broker_ok = self._broker_ok(now)
        result = self.registry.sweep(
            now=now,
            timeout_s=hb.timeout_s,
            guard_ratio=hb.guard_silent_ratio,
            guard_min_workers=hb.guard_min_workers,
            # After broker trouble, listen for one timeout again before evicting anyone: the
            # workers' heartbeats were stuck in the same outage as ours.
            evict=not self.listen_only and broker_ok and self._hold.allows(now),
            # Under mass silence, the probe's return vouches for workers really gone.
            vouched_at=self._probe_seen_at,
        )
        suspect = result.suspect_broker or not broker_ok
        if not broker_ok:
            # Only the probe's own absence restarts the wait; a mass silence with the probe
            # flowing ends as the probe vouches for each silent worker.
            self._hold.broker_silent(now)
        if suspect and not self.suspect_broker:
            log.warning(
                "%s: suspecting the broker, holding evictions",
                "this controller's own probe did not come back through the broker"
                if not broker_ok
                else f"{len(result.held)} of {len(self.registry)} workers went quiet together",
            )
        elif self.suspect_broker and not suspect:
            log.info("mass silence over: heartbeats flow again or the silent workers are gone")
        self.suspect_broker = suspect
        for worker in result.evicted:
            self.metrics.evictions.labels(EvictionReason.TIMEOUT).inc()
            log.warning(
                "evicted worker %s (%s): silent for %.1fs",
                worker.worker_id,
                ", ".join(worker.models),
                worker.age(self.clock()),
            )
        self.metrics.sweep_duration.observe(time.perf_counter() - started)

    async def _sweep_loop(self) -> None:
        interval = self.settings.heartbeat.sweep_interval_s
        while not self._stop.is_set():  # see _probe_loop
            try:
                self.sweep()
                await asyncio.wait_for(self._apply_routing(), ROUND_TIMEOUT_S)
            except BaseException as exc:
                if self._must_end(exc):
                    raise
                # With its traceback: unlike a broker error, this may be a bug.
                self._warn("sweep", "sweep failed (%r); retrying next round", exc, exc_info=True)
            await asyncio.sleep(interval)

    async def _open_main_channel(self) -> None:
        """The binding channel: declares, binds and unbinds (what a broker may refuse)."""
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=True)
        try:
            # Untracked: re-declared by _reassert_base, never left for a reopen to trip over.
            await self.topology.declare_base(channel, track=False)
            self._jobs = await channel.get_exchange(self.names.jobs, ensure=False)
            self._dead = await channel.get_exchange(self.names.dead, ensure=False)
        except BaseException:
            # The broker closed it; unreferenced, aio-pika would reopen it and keep it open.
            await self._discard(channel)
            raise
        self._channel = channel
        self._channel_closed_since = None

    async def _usable_main_channel(self) -> AbstractChannel | None:
        """The binding channel, replaced when it has stayed closed (its reopen failed)."""
        channel = self._channel
        if channel is None or not self._connected():
            return None
        if not channel.is_closed:
            self._channel_closed_since = None
            return channel
        now = self.clock()
        if self._channel_closed_since is None:
            self._channel_closed_since = now
        if now - self._channel_closed_since < CHANNEL_STUCK_S:
            return None  # a robust channel reopens itself after a channel error
        if self._main_replacing:
            # The sweeper and the stats loop both get here: two replacements at once would
            # leave one new channel open and unreferenced.
            return None
        self._main_replacing = True
        try:
            self._warn("main-channel", "binding channel closed for %.0fs: opening a new one",
                       now - self._channel_closed_since)  # fmt: skip
            await self._discard(channel)
            try:
                await self._open_main_channel()
            except Exception as exc:
                self._channel_closed_since = now  # try again after CHANNEL_STUCK_S
                self._warn("main-channel-open", "cannot open a binding channel: %s", exc)
                return None
        finally:
            self._main_replacing = False
        return self._channel

    async def _discard(self, channel: AbstractChannel | None) -> None:
        """Close a channel we are done with, for good. A robust channel the broker closed may be
        reopening right now (aio-pika restores it on its own): close that reopened one too,
        or it stays open on the connection with nobody holding it."""
        if channel is None:
            return
        if isinstance(channel, AbstractRobustChannel):

            async def close_again(*_: object) -> None:
                with contextlib.suppress(Exception):
                    await channel.close()

            channel.reopen_callbacks.add(close_again)
        # Even when its own restore failed (aio-pika then warns "Channel not opened"): close()
        # is what stops aio-pika from restoring it later.
        try:
            await asyncio.wait_for(channel.close(), ROUND_TIMEOUT_S)
        except BaseException as exc:
            if self._must_end(exc):
                raise

    def _backing_off(self, model: str, now: float) -> bool:
        entry = self._action_backoff.get(model)
        return entry is not None and now < entry[0]

    def _action_failed(self, model: str, now: float) -> None:
        delay = self._action_backoff.get(model, (0.0, BACKOFF_MIN_S / 2))[1] * 2
        delay = min(delay, BACKOFF_MAX_S)
        self._action_backoff[model] = (now + delay, delay)

    async def _apply_routing(self) -> None:
        channel = await self._usable_main_channel()
        if channel is None:
            return
        now = self.clock()
        live = self.registry.live_models()
        actions = self.routing.plan(
            now=now, live=live, listen_only=self.listen_only or self.suspect_broker
        )
        for action in actions:
            if self._backing_off(action.model, now):
                continue
            if channel.is_closed:
                break  # a refused action closed it: the rest waits for the reopen
            try:
                if action.kind is ActionKind.BIND:
                    await self.topology.bind_model(channel, action.model)
                    self.routing.mark_bound(action.model)
                    log.info("model %s routable", action.model)
                else:
                    await self.topology.unbind_model(channel, action.model)
                    self.routing.mark_unbound(action.model, now=self.clock())
                    log.warning(
                        "model %s has no live worker: unbound, failing its backlog", action.model
                    )
                self.metrics.routing_changes.labels(action.kind.value).inc()
                self._action_backoff.pop(action.model, None)
            except Exception as exc:
                self._action_failed(action.model, now)
                if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
                    self._base_suspect = True  # {ns}.jobs itself may be gone
                self._warn(
                    f"action-{action.model}",
                    "%s %s failed (%s); retrying with backoff",
                    action.kind,
                    action.model,
                    exc,
                )
        for model in self.routing.unrouted(live):
            self._start_drain(model)
        for model in self.routing.forget_stale(now=now, live=live):
            self._queue_counts.pop(model, None)
            self._action_backoff.pop(model, None)
            log.info(
                "model %s forgotten after %.0fs without workers", model, self.routing.forget_after_s
            )
        await self._write_catalog()

    # -- catalog: the models a restarted controller must know about -------------------------

    async def _read_catalog(self) -> None:
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=False)
        try:
            await self._read_catalog_on(channel)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def _read_catalog_on(self, channel: AbstractChannel) -> None:
        try:
            queue = await channel.declare_queue(self.names.catalog, passive=True)
            message = await queue.get(no_ack=False, fail=False, timeout=5)
        except Exception as exc:
            log.warning("cannot read the model catalog: %s", exc)
            return
        if message is None:
            return
        with contextlib.suppress(Exception):
            await message.nack(requeue=True)  # leave it for other controllers
        try:
            models = json.loads(message.body)["models"]
            if not isinstance(models, list):
                raise TypeError("models is not a list")
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable model catalog")
            return
        known = [m for m in models if _valid_model_name(m)][: self.settings.routing.max_models]
        invalid = len(models) - sum(1 for m in models if _valid_model_name(m))
        if invalid:
            # Anyone who can publish to the catalog queue could plant names; only valid ones
            # may become queue names and metric labels.
            self.metrics.catalog_names_invalid.inc(invalid)
            log.warning("catalog: ignored %d name(s) that fail the model-name rule", invalid)
        self.routing.learn(known, now=self.clock())
        # With planted names the stored catalog differs from ours: rewrite it.
        self._catalog_written = None if invalid else frozenset(known)
        log.info("catalog: %d known model(s)", len(known))

    async def _write_catalog(self) -> None:
        known = frozenset(self.routing.known())
        channel = self._channel
        if known == self._catalog_written or channel is None or self.listen_only:
            return
        if channel.is_closed:
            return
        body = json.dumps({"models": sorted(known), "written_at": time.time()}).encode()
        message = json_message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        try:
            await channel.default_exchange.publish(message, routing_key=self.names.catalog)
        except Exception as exc:
            log.warning("cannot write the model catalog: %s", exc)
            return
        self._catalog_written = known

    # -- no-worker handler ---------------------------------------------------------------

    def _no_worker_text(self, model: str) -> str:
        route = self.routing.route(model)
        if route is None:
            return f"no worker serves model {model!r}: no worker has announced it"
        if route.empty_since is not None:
            gone = self.clock() - route.empty_since
            return f"no live worker serves model {model!r} (the last one left {gone:.0f}s ago)"
        return f"no live worker serves model {model!r}"

    async def _fail_no_worker(self, message: AbstractIncomingMessage, model: str) -> None:
        """Error reply to the producer, copy to the error queue (reason no_worker), ack."""
        dead = self._nw_dead or self._dead
        assert dead is not None
        job_id = message.message_id or message.correlation_id or "?"
        text = self._no_worker_text(model)
        if message.reply_to:
            await self._reply_error(message, ErrorCode.NO_WORKER, text, model=model)
        copy = dead_copy(message, reason=DeadReason.NO_WORKER, error=text, model=model)
        try:
            await dead.publish(copy, routing_key=model, mandatory=False)
        except Exception as exc:
            if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
                self._base_suspect = True  # {ns}.dead is gone: re-declare the topology
            self._warn("dead-copy", "job %s: copy to the error queue failed (%s); will retry",
                       job_id[:100], exc)  # fmt: skip
            await asyncio.sleep(NACK_DELAY_S)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return
        self.metrics.controller_dead_letters.labels(DeadReason.NO_WORKER).inc()
        with contextlib.suppress(Exception):
            await message.ack()

    async def _on_unroutable(self, message: AbstractIncomingMessage) -> None:
        model = message.routing_key or ""
        if not self._heard_everyone() and not self.registry.serving(model):
            # Just started: a live worker of this model may not have spoken to us yet.
            await asyncio.sleep(
                max(0.0, 1.5 * self.settings.heartbeat.interval_s - self._since_start())
            )
        headers = message.headers or {}
        live = self.registry.serving(model)
        if live and not headers.get(REROUTED_HEADER) and await self._reroute(message, model):
            return
        await self._fail_no_worker(message, model)

    def _since_start(self) -> float:
        return 0.0 if self.started_at is None else self.clock() - self.started_at

    async def _reroute(self, message: AbstractIncomingMessage, model: str) -> bool:
        """The model has a live worker (it raced its binding): bind and send the job back.

        Under the same per-model backoff and rate-limited log as the binder, and on a
        throw-away channel: a bind the broker refuses (the model's queue re-declared with other
        arguments) closes that channel, never the binding channel, and costs one attempt per
        backoff period, not one per job."""
        connection = self._connection
        now = self.clock()
        if connection is None or not self._connected() or self._backing_off(model, now):
            return False
        headers: dict[str, Any] = dict(message.headers or {})
        headers[REROUTED_HEADER] = 1
        async with self._reroute_slots:
            if self._backing_off(model, self.clock()):
                return False  # a re-route ahead of this one just failed
            return await self._reroute_on_own_channel(connection, message, model, headers)

    async def _reroute_on_own_channel(
        self,
        connection: AbstractRobustConnection,
        message: AbstractIncomingMessage,
        model: str,
        headers: dict[str, Any],
    ) -> bool:
        now = self.clock()
        deadline = headers.get(DEADLINE_HEADER)
        # Epoch milliseconds (see Client._publish); read after waiting for a slot.
        remaining = deadline / 1000 - time.time() if isinstance(deadline, (int, float)) else None
        if remaining is not None and remaining <= 0:
            return False
        try:
            channel = await asyncio.wait_for(
                connection.channel(publisher_confirms=True), ROUND_TIMEOUT_S
            )
        except Exception as exc:
            self._warn("reroute", "re-routing job %s: no channel (%r)", message.message_id, exc)
            return False
        try:
            try:
                await self.topology.bind_model(channel, model)
            except Exception as exc:
                self._action_failed(model, now)
                if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
                    self._base_suspect = True
                self._warn(
                    f"action-{model}",
                    "binding %s to re-route a job failed (%s); retrying with backoff",
                    model,
                    exc,
                )
                return False
            self.routing.mark_bound(model)
            jobs = await channel.get_exchange(self.names.jobs, ensure=False)
            await jobs.publish(
                aio_pika.Message(
                    message.body,
                    headers=headers,
                    content_type=message.content_type,
                    message_id=message.message_id,
                    correlation_id=message.correlation_id,
                    reply_to=message.reply_to,
                    expiration=remaining,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    timestamp=message.timestamp,
                    type="job",
                ),
                routing_key=model,
                mandatory=False,
            )
        except Exception as exc:
            self._warn("reroute", "re-routing job %s failed: %s", message.message_id, exc)
            return False
        finally:
            await self._discard(channel)
        with contextlib.suppress(Exception):
            await message.ack()
        return True

    def _start_drain(self, model: str) -> None:
        if model in self._drains or self._stop.is_set():
            return  # one drain at a time per model
        if self._queue_counts.get(model, (0, 0))[0] == 0:
            return  # empty or missing at the last count (read fresh every stats round)
        task = asyncio.create_task(self._drain(model), name=f"modelfleet-drain-{model}")
        self._drains[model] = task
        task.add_done_callback(lambda done: self._drain_done(model, done))

    def _drain_done(self, model: str, task: asyncio.Task[None]) -> None:
        if self._drains.get(model) is task:
            del self._drains[model]

    async def _drain(self, model: str) -> None:
        """Fail the backlog of an unbound model with NO_WORKER, until empty or a worker returns."""
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=False)
        drained = 0
        emptied = False
        try:
            # Passive and untracked: a queue someone re-declared with other arguments is still
            # drained, and the throw-away channel remembers nothing.
            queue = await channel.declare_queue(
                self.names.model_queue(model), passive=True, robust=False
            )
            while not self.registry.serving(model) and not self.routing.routable(model):
                message = await queue.get(no_ack=False, fail=False, timeout=5)
                if message is None:
                    emptied = True
                    break
                await self._fail_no_worker(message, model)
                drained += 1
        except Exception as exc:
            self._warn(f"drain-{model}", "draining %s stopped: %s", model, exc)
        finally:
            await self._discard(channel)
        if drained:
            log.warning("model %s: %d queued job(s) failed with NO_WORKER", model, drained)
        if emptied and model in self._queue_counts:
            # Only a drain that reached the end knows the depth; otherwise the next stats round
            # reads it.
            self._queue_counts[model] = (0, self._queue_counts[model][1])

    # -- queue statistics ------------------------------------------------------------------

    async def _stats_loop(self) -> None:
        interval = self.settings.routing.stats_interval_s
        while not self._stop.is_set():  # see _probe_loop
            try:
                await asyncio.wait_for(self.refresh_queue_counts(), ROUND_TIMEOUT_S)
                await asyncio.wait_for(self._send_notices(), ROUND_TIMEOUT_S)
                self._rounds += 1
                if self._rounds % REBIND_EVERY_ROUNDS == 0 or self._base_suspect:
                    await asyncio.wait_for(self._reassert_base(), ROUND_TIMEOUT_S)
                    await asyncio.wait_for(self._reassert_bindings(), ROUND_TIMEOUT_S)
            except BaseException as exc:
                if self._must_end(exc):
                    raise
                # It may be what failed: take a new one next round.
                stats_channel, self._stats_channel = self._stats_channel, None
                await self._discard(stats_channel)
                self._warn("stats", "queue statistics failed (%r); retrying next round", exc)
            await asyncio.sleep(interval)

    async def _reassert_base(self) -> None:
        """Declare the base topology again (idempotent): an exchange or queue deleted under us
        (by hand, by a broker reset) comes back, and clients recover without our restart."""
        channel = await self._usable_main_channel()
        if channel is None:
            return
        try:
            await self.topology.declare_base(channel, track=False)
            # Bindings die with their exchange: re-bind the dead-letter tap too.
            await self.topology.declare_dead_tap(channel, self.instance, track=False)
        except Exception as exc:
            self._warn("base", "cannot declare the base topology (%s); retrying", exc)
            return
        if self._base_suspect:
            log.info("base topology declared again")
            self._catalog_written = None  # the catalog queue may be new and empty
        self._base_suspect = False

    async def refresh_queue_counts(self) -> None:
        assert self._connection is not None
        for model in sorted(self.routing.known()):
            if self._stats_channel is None or self._stats_channel.is_closed:
                self._stats_channel = await self._connection.channel(publisher_confirms=False)
            try:
                counts = await self.topology.queue_counts(self._stats_channel, model)
            except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPError) as exc:
                log.debug("queue counts of %s: %s", model, exc)
                stats_channel, self._stats_channel = self._stats_channel, None
                await self._discard(stats_channel)
                continue
            if counts is None:
                self._queue_counts.pop(model, None)
                stats_channel, self._stats_channel = self._stats_channel, None
                await self._discard(stats_channel)  # a passive miss closed it
            else:
                self._queue_counts[model] = counts
                unbound = self.routing.unbound(model) and not self.registry.serving(model)
                if counts[0] > 0 and unbound:
                    self._start_drain(model)

    async def _reassert_bindings(self) -> None:
        channel = await self._usable_main_channel()
        if channel is None:
            return
        for model in sorted(self.registry.live_models()):
            if self.routing.routable(model) and not self._backing_off(model, self.clock()):
                if channel.is_closed:
                    return
                try:
                    await self.topology.bind_model(channel, model)
                except Exception as exc:
                    self._action_failed(model, self.clock())
                    self._warn(f"action-{model}", "re-binding %s failed (%s)", model, exc)

    # -- status --------------------------------------------------------------------------

    def model_figures(self) -> list[ModelFigures]:
        views = self.registry.models()
        names = sorted(set(views) | self.routing.known())
        figures = []
        for name in names:
            view = views.get(name)
            counts = self._queue_counts.get(name)
            figures.append(
                ModelFigures(
                    name=name,
                    workers=view.workers if view else 0,
                    capacity=view.capacity if view else 0,
                    in_flight=view.in_flight if view else 0,
                    queue_depth=counts[0] if counts else None,
                    consumers=counts[1] if counts else None,
                    routable=self.routing.routable(name),
                )
            )
        return figures

    def worker_figures(self) -> list[WorkerFigures] | None:
        if len(self.registry) > self.settings.metrics.max_worker_series:
            return None
        now = self.clock()
        stuck_after = self.settings.worker.stuck_after_s
        return [
            WorkerFigures(
                worker_id=w.worker_id,
                in_flight=w.in_flight,
                concurrency=w.concurrency,
                heartbeat_age_s=w.age(now),
                stuck_jobs=max(w.stuck_jobs, int(w.oldest_job_age_s > stuck_after)),
            )
            for w in self.registry.workers()
        ]

    def fleet_figures(self) -> dict[str, float]:
        return {
            "modelfleet_workers": float(len(self.registry)),
            "modelfleet_controller_listen_only": float(self.listen_only),
            "modelfleet_controller_suspect_broker": float(self.suspect_broker),
            "modelfleet_controller_heartbeat_consumer_up": float(self.heartbeat_consumer_up),
        }

    def models_status(self) -> list[dict[str, Any]]:
        return [
            {
                "name": f.name,
                "workers": f.workers,
                "capacity": f.capacity,
                "in_flight": f.in_flight,
                "queue_depth": f.queue_depth,
                "routable": f.routable,
            }
            for f in self.model_figures()
        ]

    def workers_status(self) -> list[dict[str, Any]]:
        now = self.clock()
        stuck_after = self.settings.worker.stuck_after_s
        return [
            {
                "worker_id": w.worker_id,
                "models": list(w.models),
                "concurrency": w.concurrency,
                "in_flight": w.in_flight,
                "state": w.state.value,
                "last_heartbeat_age_s": round(w.age(now), 3),
                "host": w.host,
                "pid": w.pid,
                "version": w.version,
                "speed": w.speed,
                "oldest_job_age_s": round(w.oldest_job_age_s, 3),
                "stuck": w.stuck_jobs > 0 or w.oldest_job_age_s > stuck_after,
                "counters": w.counters.model_dump(),
            }
            for w in self.registry.workers()
        ]
