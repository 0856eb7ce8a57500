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
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import ValidationError

from modelfleet.config import Settings
from modelfleet.connections import connect
from modelfleet.errors import ErrorCode
from modelfleet.messages import ErrorReply, Heartbeat
from modelfleet.metrics import ControllerMetrics, ModelFigures, WorkerFigures, reason_label
from modelfleet.registry import EvictionReason, Observation, Registry
from modelfleet.routing import ActionKind, RoutingTable
from modelfleet.security import heartbeat_sender_allowed
from modelfleet.stats import FleetStats
from modelfleet.topology import (
    DEADLINE_HEADER,
    MODEL_HEADER,
    DeadReason,
    Names,
    Topology,
    dead_copy,
    dead_reason,
    json_message,
)

__all__ = ["Controller"]

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
        self._jobs: AbstractExchange | None = None
        self._dead: AbstractExchange | None = None
        self._hb_queue: AbstractQueue | None = None
        self._hb_channel: AbstractChannel | None = None
        self._unroutable_queue: AbstractQueue | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._drains: dict[str, asyncio.Task[None]] = {}
        self._catalog_written: frozenset[str] | None = None
        self._stop = asyncio.Event()
        self._rounds = 0
        self._kick_pending = False
        self._kick_again = False
        self._probe_seen_at: float | None = None
        self._evict_after = 0.0
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
    def healthy(self) -> bool:
        connected = self._connection is not None and not self._connection.is_closed
        return connected and not self.listen_only

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._connection = await connect(self.settings.amqp, role="controller")
        self._channel = await self._connection.channel(publisher_confirms=True)
        await self.topology.declare_base(self._channel)
        self._jobs = await self._channel.get_exchange(self.names.jobs)
        self._dead = await self._channel.get_exchange(self.names.dead)
        self._stats_channel = await self._connection.channel(publisher_confirms=False)
        self.started_at = self.clock()
        await self._read_catalog()

        self._hb_channel = await self._connection.channel(publisher_confirms=False)
        self._hb_queue = await self.topology.declare_controller_queue(
            self._hb_channel, self.instance
        )
        await self._consume_heartbeats()
        self._connection.reconnect_callbacks.add(self._on_reconnected)

        tap_channel = await self._connection.channel(publisher_confirms=False)
        tap = await self.topology.declare_dead_tap(tap_channel, self.instance)
        await tap.consume(self._on_dead_letter, no_ack=True)

        nw_channel = await self._connection.channel(publisher_confirms=True)
        await nw_channel.set_qos(prefetch_count=200)
        self._unroutable_queue = await nw_channel.declare_queue(self.names.unroutable, passive=True)
        await self._unroutable_queue.consume(self._on_unroutable)

        self._tasks = [
            asyncio.create_task(self._sweep_loop(), name="modelfleet-sweeper"),
            asyncio.create_task(self._stats_loop(), name="modelfleet-stats"),
            asyncio.create_task(self._probe_loop(), name="modelfleet-probe"),
        ]
        log.info(
            "controller %s watching namespace %s (listen-only for %.1fs)",
            self.instance,
            self.names.ns,
            self.settings.startup_listen_s,
        )

    async def stop(self) -> None:
        self._stop.set()
        for task in [*self._tasks, *self._drains.values()]:
            task.cancel()
        for task in [*self._tasks, *self._drains.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
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
        """Start, run until SIGTERM/SIGINT, stop."""
        await self.start()
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self._stop.set)
        try:
            await self._stop.wait()
        finally:
            await self.stop()

    # -- heartbeats ----------------------------------------------------------------------

    def _drop(self, cause: str, detail: str) -> None:
        self.metrics.heartbeats_invalid.labels(cause).inc()
        if cause not in self._logged_causes:  # once per cause: a flood must not flood the log
            self._logged_causes.add(cause)
            log.warning(
                "dropping invalid heartbeat (%s): %s (logged once per cause)", cause, detail
            )

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
        if not self._admit_models(hb.models):
            observation = Observation.REFUSED
        else:
            observation = self.registry.observe(hb, now=self.clock(), wall_now=time.time())
        if observation is Observation.REFUSED:
            self._drop("models_cap", f"worker {hb.worker_id} would exceed routing.max_models")
            return observation
        self.metrics.heartbeats.inc()
        lag = time.time() - hb.sent_at
        # sent_at is the worker's wall clock: a heartbeat never waits longer than queue_ttl_s in
        # our queue, so a larger "lag" is a skewed or forged clock and would poison the histogram.
        if lag <= self.settings.heartbeat.queue_ttl_s:
            self.metrics.heartbeat_lag.observe(max(0.0, lag))
        if observation is not Observation.IGNORED:
            self.fleet_stats.update(hb.worker_id, hb.stats)
        if observation is Observation.ADDED:
            log.info("worker %s joined: %s", hb.worker_id, ", ".join(hb.models))
        elif observation is Observation.REMOVED:
            if hb.stop_reason == "stuck":
                self.metrics.evictions.labels(EvictionReason.STUCK).inc()
                log.warning(
                    "worker %s left: a job was stuck past worker.stuck_exit_s", hb.worker_id
                )
            else:
                self.metrics.evictions.labels(EvictionReason.STOPPING).inc()
                log.info("worker %s left (stopping)", hb.worker_id)
        if observation in (Observation.ADDED, Observation.REMOVED) or (
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
        return. Its absence means the data plane, not the workers, has stopped."""
        assert self._connection is not None
        interval = self.settings.heartbeat.interval_s
        self._probe_seen_at = self.clock()
        channel: AbstractChannel | None = None
        while True:
            try:
                if channel is None or channel.is_closed:
                    channel = await self._connection.channel(publisher_confirms=False)
                exchange = await channel.get_exchange(self.names.heartbeats, ensure=False)
                probe = aio_pika.Message(
                    self.instance.encode(), type=PROBE_TYPE, expiration=interval * 2
                )
                await asyncio.wait_for(exchange.publish(probe, "", mandatory=False), interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("probe not sent: %s", exc)
            await asyncio.sleep(interval)

    async def _consume_heartbeats(self) -> None:
        """Consume heartbeats with aiormq directly: a large fleet's hot path skips aio-pika's
        per-message wrapper (measured: most of the cost of a heartbeat beyond its validation).
        A robust reconnect does not restore such a consumer; _on_reconnected does."""
        assert self._hb_channel is not None and self._hb_queue is not None
        underlay = await self._hb_channel.get_underlay_channel()
        await underlay.basic_consume(self._hb_queue.name, self._on_heartbeat, no_ack=True)

    def _on_reconnected(self, *_: object) -> None:
        if self._stop.is_set():
            return
        task = asyncio.create_task(self._consume_heartbeats(), name="modelfleet-heartbeats")
        self._tasks.append(task)
        task.add_done_callback(self._forget_task)

    async def _on_heartbeat(self, message: aiormq.abc.DeliveredMessage) -> None:
        properties = message.header.properties
        if properties.message_type == PROBE_TYPE:
            if message.body == self.instance.encode():
                self._probe_seen_at = self.clock()
            return  # another controller's probe: not a heartbeat, not an error
        # user_id is checked by the broker (it must be the sender's own user): only the users in
        # security.heartbeat_users (when set) may announce workers.
        user_id = properties.user_id
        if not heartbeat_sender_allowed(user_id, self.settings.security.heartbeat_users):
            sender = "no user_id" if user_id is None else f"user {user_id!r}"
            self._drop("user", f"heartbeat from {sender[:120]}, not in security.heartbeat_users")
            return
        self.handle_heartbeat(message.body)

    async def _on_dead_letter(self, message: AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        model = headers.get(MODEL_HEADER) or message.routing_key or ""
        if isinstance(model, bytes):
            model = model.decode(errors="replace")
        known = model in self.routing or model in self.registry.model_names()
        label = model if isinstance(model, str) and known else "other"
        reason = dead_reason(headers)
        self.metrics.dead_letters.labels(label, reason_label(reason)).inc()
        if reason == DeadReason.DELIVERY_LIMIT and message.reply_to and self._channel is not None:
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
        assert self._channel is not None
        job_id = message.message_id or message.correlation_id or "?"
        reply = ErrorReply.build(code, text, model=model, job_id=job_id)
        with contextlib.suppress(Exception):
            await self._channel.default_exchange.publish(
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
            evict=not self.listen_only and broker_ok and now >= self._evict_after,
        )
        suspect = result.suspect_broker or not broker_ok
        if suspect:
            self._evict_after = now + hb.timeout_s
        if suspect and not self.suspect_broker:
            log.warning(
                "%s: suspecting the broker, holding evictions",
                "this controller's own probe did not come back through the broker"
                if not broker_ok
                else f"{len(result.silent)} of {len(self.registry)} workers went quiet together",
            )
        elif self.suspect_broker and not suspect:
            log.info("heartbeats flow again; evictions resume after one heartbeat timeout")
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
        while True:
            try:
                self.sweep()
                await self._apply_routing()
            except Exception:
                log.exception("sweep failed; retrying next round")
            await asyncio.sleep(interval)

    async def _apply_routing(self) -> None:
        if self._channel is None:
            return
        now = self.clock()
        live = self.registry.live_models()
        actions = self.routing.plan(
            now=now, live=live, listen_only=self.listen_only or self.suspect_broker
        )
        for action in actions:
            try:
                if action.kind is ActionKind.BIND:
                    await self.topology.bind_model(self._channel, action.model)
                    self.routing.mark_bound(action.model)
                    log.info("model %s routable", action.model)
                else:
                    await self.topology.unbind_model(self._channel, action.model)
                    self.routing.mark_unbound(action.model, now=self.clock())
                    log.warning(
                        "model %s has no live worker: unbound, failing its backlog", action.model
                    )
                self.metrics.routing_changes.labels(action.kind.value).inc()
            except Exception as exc:
                log.warning("%s %s failed (%s); will retry", action.kind, action.model, exc)
        for model in self.routing.unrouted(live):
            self._start_drain(model)
        for model in self.routing.forget_stale(now=now, live=live):
            self._queue_counts.pop(model, None)
            log.info(
                "model %s forgotten after %.0fs without workers", model, self.routing.forget_after_s
            )
        await self._write_catalog()

    # -- catalog: the models a restarted controller must know about -------------------------

    async def _read_catalog(self) -> None:
        assert self._channel is not None
        try:
            queue = await self._channel.declare_queue(self.names.catalog, passive=True)
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
            known = [m for m in models if isinstance(m, str)][: self.settings.routing.max_models]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable model catalog")
            return
        self.routing.learn(known, now=self.clock())
        self._catalog_written = frozenset(known)
        log.info("catalog: %d known model(s)", len(known))

    async def _write_catalog(self) -> None:
        known = frozenset(self.routing.known())
        if known == self._catalog_written or self._channel is None or self.listen_only:
            return
        body = json.dumps({"models": sorted(known), "written_at": time.time()}).encode()
        message = json_message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        try:
            await self._channel.default_exchange.publish(message, routing_key=self.names.catalog)
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
        assert self._channel is not None and self._dead is not None
        job_id = message.message_id or message.correlation_id or "?"
        text = self._no_worker_text(model)
        if message.reply_to:
            await self._reply_error(message, ErrorCode.NO_WORKER, text, model=model)
        copy = dead_copy(message, reason=DeadReason.NO_WORKER, error=text, model=model)
        try:
            await self._dead.publish(copy, routing_key=model, mandatory=False)
        except Exception as exc:
            log.warning("job %s: copy to the error queue failed (%s); will retry", job_id, exc)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return
        self.metrics.controller_dead_letters.labels(DeadReason.NO_WORKER).inc()
        with contextlib.suppress(Exception):
            await message.ack()

    async def _on_unroutable(self, message: AbstractIncomingMessage) -> None:
        model = message.routing_key or ""
        if not self._heard_everyone() and model not in self.registry.live_models():
            # Just started: a live worker of this model may not have spoken to us yet.
            await asyncio.sleep(
                max(0.0, 1.5 * self.settings.heartbeat.interval_s - self._since_start())
            )
        headers = message.headers or {}
        live = model in self.registry.live_models()
        if live and not headers.get(REROUTED_HEADER) and await self._reroute(message, model):
            return
        await self._fail_no_worker(message, model)

    def _since_start(self) -> float:
        return 0.0 if self.started_at is None else self.clock() - self.started_at

    async def _reroute(self, message: AbstractIncomingMessage, model: str) -> bool:
        """The model has a live worker (it raced its binding): bind and send the job back."""
        assert self._channel is not None and self._jobs is not None
        headers: dict[str, Any] = dict(message.headers or {})
        deadline = headers.get(DEADLINE_HEADER)
        # Epoch milliseconds (see Client._publish).
        remaining = deadline / 1000 - time.time() if isinstance(deadline, (int, float)) else None
        if remaining is not None and remaining <= 0:
            return False
        headers[REROUTED_HEADER] = 1
        try:
            await self.topology.bind_model(self._channel, model)
            self.routing.mark_bound(model)
            await self._jobs.publish(
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
            log.warning("re-routing job %s failed: %s", message.message_id, exc)
            return False
        with contextlib.suppress(Exception):
            await message.ack()
        return True

    def _start_drain(self, model: str) -> None:
        task = self._drains.get(model)
        if task is not None and not task.done():
            return
        if self._queue_counts.get(model, (1, 0))[0] == 0 and task is not None:
            return  # drained before and nothing arrived since
        self._drains[model] = asyncio.create_task(
            self._drain(model), name=f"modelfleet-drain-{model}"
        )

    async def _drain(self, model: str) -> None:
        """Fail the backlog of an unbound model with NO_WORKER, until empty or a worker returns."""
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=False)
        drained = 0
        try:
            queue = await self.topology.declare_model_queue(channel, model)
            while model not in self.registry.live_models() and not self.routing.routable(model):
                message = await queue.get(no_ack=False, fail=False, timeout=5)
                if message is None:
                    break
                await self._fail_no_worker(message, model)
                drained += 1
        except Exception as exc:
            log.warning("draining %s stopped: %s", model, exc)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        if drained:
            log.warning("model %s: %d queued job(s) failed with NO_WORKER", model, drained)
        self._queue_counts[model] = (0, self._queue_counts.get(model, (0, 0))[1])

    # -- queue statistics ------------------------------------------------------------------

    async def _stats_loop(self) -> None:
        interval = self.settings.routing.stats_interval_s
        while True:
            try:
                await self.refresh_queue_counts()
                self._rounds += 1
                if self._rounds % REBIND_EVERY_ROUNDS == 0:
                    await self._reassert_bindings()
            except Exception:
                log.exception("queue statistics failed; retrying next round")
            await asyncio.sleep(interval)

    async def refresh_queue_counts(self) -> None:
        assert self._connection is not None
        for model in sorted(self.routing.known()):
            if self._stats_channel is None or self._stats_channel.is_closed:
                self._stats_channel = await self._connection.channel(publisher_confirms=False)
            try:
                counts = await self.topology.queue_counts(self._stats_channel, model)
            except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPError) as exc:
                log.debug("queue counts of %s: %s", model, exc)
                self._stats_channel = None
                continue
            if counts is None:
                self._queue_counts.pop(model, None)
                self._stats_channel = None  # a passive miss closed it
            else:
                self._queue_counts[model] = counts
                if counts[0] > 0 and model in self.routing.unrouted(self.registry.live_models()):
                    self._start_drain(model)

    async def _reassert_bindings(self) -> None:
        assert self._channel is not None
        for model in sorted(self.registry.live_models()):
            if self.routing.routable(model):
                with contextlib.suppress(Exception):
                    await self.topology.bind_model(self._channel, model)

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
