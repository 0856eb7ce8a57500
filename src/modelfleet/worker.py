"""The worker SDK: serve one or more models from their queues with a handler.

A handler takes a :class:`~modelfleet.jobs.Job` and is one of:

* a coroutine function — ``async def handle(job): return {...}``;
* a plain function — run in a thread, so the event loop (and the heartbeats) stay live;
* an async or plain generator — a stream: each yield is a chunk; ``yield Final(value)`` sets the
  result (a plain generator may also ``return value``).

>>> async def handle(job: Job) -> dict:
...     return {"text": job.payload["prompt"].upper()}
>>> worker = Worker(handle, models=["shout"], settings=settings)
>>> await worker.run()  # until SIGTERM / SIGINT

Guarantees: at most ``concurrency`` jobs run at once (prefetch per model queue, plus a semaphore
across models); a job is acked only after its answer was published, so a worker that dies
mid-job leaves it to another worker; a handler exception or an invalid job never stops the
worker — the producer gets an error reply and the job goes to the error queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from secrets import token_hex
from typing import Any, Literal

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import BaseModel, ValidationError

from modelfleet import __version__
from modelfleet.acks import AckBatcher
from modelfleet.cancel import JobCancelled, JobCanceller
from modelfleet.config import Settings
from modelfleet.connections import connect
from modelfleet.errors import ErrorCode, InvalidJobError, JobError
from modelfleet.jobs import Final, Job
from modelfleet.messages import (
    ChunkReply,
    ErrorReply,
    Heartbeat,
    JobCounters,
    JobRequest,
    ResultReply,
    WorkerState,
    check_model_name,
)
from modelfleet.publishing import publish, reply_properties
from modelfleet.security import amqp_user, declare_where_allowed
from modelfleet.stats import Outcome, WorkerStats
from modelfleet.topology import (
    DeadReason,
    Names,
    Topology,
    dead_copy,
    json_message,
)

__all__ = ["Handler", "Worker"]

log = logging.getLogger(__name__)

Handler = Callable[[Job], Any]

_STREAM_END = object()
# Set-up attempts when the broker closes the connection during it (see Worker.start).
_START_ATTEMPTS = 5
# Dead-letter reason of a job whose handler raised a JobError with this code.
_DEAD_REASON_OF = {
    ErrorCode.OVERLOADED: DeadReason.OVERLOADED,
    ErrorCode.WORKER_TIMEOUT: DeadReason.EXPIRED,
    ErrorCode.EXPIRED: DeadReason.EXPIRED,
}
# A flood of bad jobs must not flood the log: each failure cause is logged at most this often
# (every failure is still counted, in the heartbeat's counters).
LOG_CAUSE_EVERY_S = 60.0


class _HandlerKind:
    ASYNC = "async"
    THREAD = "thread"
    ASYNC_GEN = "async_gen"
    GEN = "gen"


def _kind_of(handler: Handler) -> str:
    target = handler
    if not (inspect.isfunction(target) or inspect.ismethod(target)) and callable(target):
        call = getattr(target, "__call__", None)  # noqa: B004 - callable objects
        target = call if call is not None else target
    if inspect.isasyncgenfunction(target):
        return _HandlerKind.ASYNC_GEN
    if inspect.isgeneratorfunction(target):
        return _HandlerKind.GEN
    if inspect.iscoroutinefunction(target):
        return _HandlerKind.ASYNC
    return _HandlerKind.THREAD


class _Failure(Exception):
    """Internal: end a job with an error reply and a dead-letter reason."""

    def __init__(self, code: ErrorCode, reason: str, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        # A word from a small fixed set, for logging once per cause: finer than the reason.
        self.cause = cause or reason


class Worker:
    """Serves ``models`` with ``handler``.

    Keywords:
        settings: all tunables (``worker.*``, ``heartbeat.*``, ``amqp.*``, ``namespace``);
            defaults when omitted.
        url: AMQP URL, overrides ``settings.amqp.url``.
        namespace: overrides ``settings.namespace``.
        concurrency: jobs at once, overrides ``settings.worker.concurrency``.
        worker_id: stable identity in the registry (default: ``host-pid-random``).
        install_signal_handlers: :meth:`run` stops cleanly on SIGTERM/SIGINT (default True).
        on_stuck: called when a job outlives ``worker.stuck_exit_s`` after the final heartbeat
            (default: exit the process with status 75, so a supervisor restarts it).
    """

    def __init__(
        self,
        handler: Handler,
        models: Iterable[str],
        *,
        settings: Settings | None = None,
        url: str | None = None,
        namespace: str | None = None,
        concurrency: int | None = None,
        worker_id: str | None = None,
        install_signal_handlers: bool = True,
        on_stuck: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.models: tuple[str, ...] = tuple(dict.fromkeys(check_model_name(m) for m in models))
        if not self.models:
            raise ValueError("a worker needs at least one model")
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        self.handler = handler
        self._kind = _kind_of(handler)
        self.url = url or self.settings.amqp.url
        self.names = Names(namespace or self.settings.namespace)
        self.topology = Topology(self.names, self.settings.routing, self.settings.heartbeat)
        self.concurrency = concurrency or self.settings.worker.concurrency
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{token_hex(3)}"
        self._install_signals = install_signal_handlers
        # What to do when a job outlives worker.stuck_exit_s (default: end the process).
        self.on_stuck: Callable[[], None] = on_stuck or _exit_process

        self.state = WorkerState.READY
        self.counters: dict[str, int] = dict.fromkeys(JobCounters.model_fields, 0)
        self.stats = WorkerStats(self.models)
        self._running: dict[str, float] = {}  # job id -> monotonic start
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._seq = 0
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._dead_channel: AbstractChannel | None = None
        self._hb_exchange: AbstractExchange | None = None
        self._dead_exchange: AbstractExchange | None = None
        self._queues: list[tuple[AbstractQueue, str]] = []
        self._hb_task: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._started = False
        self._stop_reason: Literal["shutdown", "stuck"] = "shutdown"
        self._logged_causes: dict[str, float] = {}  # failure cause -> monotonic time logged
        # Producers' cancellations (modelfleet.cancel); a thread cannot be interrupted, so only
        # coroutine and async-generator handlers are stopped mid-run.
        self.cancels = JobCanceller(
            self.worker_id,
            cancel_running=self._kind in (_HandlerKind.ASYNC, _HandlerKind.ASYNC_GEN),
        )
        self._paused = False  # pause(): consumers cancelled, state draining, until resume()
        self._acks = AckBatcher()  # finished jobs are acked in batches, one per loop turn

    # -- figures -------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def oldest_job_age_s(self, now: float | None = None) -> float:
        if not self._running:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(0.0, now - min(self._running.values()))

    def heartbeat(self, state: WorkerState | None = None) -> Heartbeat:
        """The heartbeat this worker would send now."""
        now = time.monotonic()
        stuck_after = self.settings.worker.stuck_after_s
        self._seq += 1
        return Heartbeat(
            worker_id=self.worker_id,
            models=self.models,
            concurrency=self.concurrency,
            in_flight=self.in_flight,
            oldest_job_age_s=self.oldest_job_age_s(now),
            stuck_jobs=sum(1 for t in self._running.values() if now - t > stuck_after),
            state=state or self.state,
            speed=self.settings.worker.speed,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            sent_at=time.time(),
            interval_s=self.settings.heartbeat.interval_s,
            seq=self._seq,
            counters=JobCounters(**self.counters),
            stats=self.stats.snapshot(),
            stop_reason=self._stop_reason
            if (state or self.state) is WorkerState.STOPPING
            else None,
        )

    # -- life cycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect, declare, start consuming and heartbeating."""
        if self._started:
            return
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                await self._open()
                break
            except aiormq.exceptions.ConnectionInternalError as exc:
                # RabbitMQ 3.10 crashes the channel (and closes the connection with
                # INTERNAL_ERROR) on a basic.consume that reaches a quorum queue another worker
                # is declaring at this very moment, before its Raft member runs. A moment later
                # the queue is there: start again.
                await self._close_connection()
                if attempt == _START_ATTEMPTS:
                    raise
                log.warning(
                    "worker %s: the broker closed the connection while it set up (%s); "
                    "trying again (%d/%d)",
                    self.worker_id,
                    exc,
                    attempt,
                    _START_ATTEMPTS,
                )
                await asyncio.sleep(0.2 * attempt)
            except BaseException:
                await self._close_connection()  # a failed start leaves nothing open
                raise
        self._started = True
        await self._send_heartbeat()
        self._hb_task = asyncio.create_task(self._heartbeat_loop(), name="modelfleet-heartbeat")
        log.info(
            "worker %s serving %s (concurrency %d, namespace %s)",
            self.worker_id,
            ", ".join(self.models),
            self.concurrency,
            self.names.ns,
        )

    async def _open(self) -> None:
        """Connect, declare and consume (:meth:`start` without the retries)."""
        self._queues = []
        self._connection = await connect(self.settings.amqp, role="worker", url=self.url)
        self._channel = await self._connection.channel(publisher_confirms=False)
        # Quorum queues have no global QoS: prefetch is per consumer, the semaphore caps the sum.
        # worker.prefetch above concurrency: jobs wait here for a slot instead of for an ack's
        # round trip to the broker.
        await self._channel.set_qos(
            prefetch_count=max(self.concurrency, self.settings.worker.prefetch)
        )
        self._dead_channel = await self._connection.channel(publisher_confirms=True)
        # A least-privilege worker may not declare the namespace: then it only checks it.
        await declare_where_allowed(
            self._connection,
            self._dead_channel,
            self.topology.declare_base,
            required=(self.names.heartbeats, self.names.dead),
        )
        self._hb_exchange = await self._channel.get_exchange(self.names.heartbeats)
        self._dead_exchange = await self._dead_channel.get_exchange(self.names.dead)
        # Before consuming: a job delivered before _started is handed back (a return counted
        # against its delivery limit), so nothing slow may come between the two.
        await self.cancels.start(self._connection, self.topology)
        for model in self.models:
            queue = await self.topology.declare_model_queue(self._channel, model)
            tag = "" if self._paused else await queue.consume(self._on_message)
            self._queues.append((queue, tag))

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or :meth:`request_stop`), then stop cleanly."""
        await self.start()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if self._install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.request_stop)
                    installed.append(sig)
        try:
            await self._stop_requested.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking jobs, let in-flight ones finish (or hand them back after ``grace_s``),
        send a final ``stopping`` heartbeat and close."""
        if not self._started:
            return
        self._started = False
        self._stop_requested.set()
        grace = self.settings.worker.stop_grace_s if grace_s is None else grace_s
        self.state = WorkerState.DRAINING
        # Bounded: on a connection that is down, a robust channel waits for the reconnection
        # before it cancels, and a stop must never wait for that (jobs delivered meanwhile are
        # handed back by _on_message).
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.settings.heartbeat.interval_s):
                for queue, tag in self._queues:
                    with contextlib.suppress(Exception):
                        await queue.cancel(tag)
        await self._send_heartbeat()
        pending = set(self._tasks)
        if pending:
            log.info(
                "worker %s: waiting up to %.1fs for %d job(s)", self.worker_id, grace, len(pending)
            )
            _, pending = await asyncio.wait(pending, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        if self._hb_task is not None:
            self._hb_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._hb_task
        await self._acks.aclose()
        self.state = WorkerState.STOPPING
        await self._send_heartbeat()
        await self._close_connection()
        log.info("worker %s stopped", self.worker_id)

    async def pause(self) -> None:
        """Stop taking jobs until :meth:`resume`: cancel the consumers and report ``draining``
        (the controller then routes around this worker). Jobs already running finish; jobs
        delivered but not started go back to the queue. Callable before :meth:`start`."""
        if self._paused:
            return
        self._paused = True
        self.state = WorkerState.DRAINING
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.settings.heartbeat.interval_s):
                for index, (queue, tag) in enumerate(self._queues):
                    if tag:
                        self._queues[index] = (queue, "")
                        await queue.cancel(tag)
        await self._send_heartbeat()

    async def resume(self) -> None:
        """Take jobs again after :meth:`pause` (state ``ready``)."""
        if not self._paused or self._stop_requested.is_set():
            return
        self._paused = False
        for index, (queue, tag) in enumerate(self._queues):
            if not tag:
                self._queues[index] = (queue, await queue.consume(self._on_message))
        self.state = WorkerState.READY
        await self._send_heartbeat()

    # -- heartbeats ----------------------------------------------------------------------

    async def _send_heartbeat(self) -> None:
        if self._hb_exchange is None:
            return
        hb = self.heartbeat()
        message = json_message(
            hb.model_dump_json().encode(),
            # A heartbeat older than the timeout says nothing true any more.
            expiration=self.settings.heartbeat.timeout_s,
            type="heartbeat",
            # Checked by the broker; the controller may accept only some users' heartbeats.
            user_id=amqp_user(self.url),
        )
        try:
            await asyncio.wait_for(
                self._hb_exchange.publish(message, routing_key="", mandatory=False),
                timeout=self.settings.heartbeat.interval_s,
            )
        except Exception as exc:  # broker outage: keep serving, the next beat will tell
            log.warning(
                "worker %s: heartbeat not sent: %s", self.worker_id, exc or type(exc).__name__
            )

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat.interval_s
        stuck_exit = self.settings.worker.stuck_exit_s
        while True:
            await asyncio.sleep(interval)
            if stuck_exit is not None and self.oldest_job_age_s() > stuck_exit:
                await self._exit_stuck(stuck_exit)
                return
            await self._send_heartbeat()

    async def _exit_stuck(self, limit_s: float) -> None:
        """A job outlived ``worker.stuck_exit_s``: say so, then leave so the broker requeues.

        A handler running in a thread cannot be cancelled, so the process is the unit of
        recovery: exiting closes the connection and every job it held goes back to its queue.
        """
        log.error(
            "worker %s: a job has run %.0fs (> worker.stuck_exit_s=%.0fs); exiting so its jobs "
            "are requeued",
            self.worker_id,
            self.oldest_job_age_s(),
            limit_s,
        )
        self._stop_reason = "stuck"
        self.state = WorkerState.STOPPING
        await self._send_heartbeat()
        self.on_stuck()

    # -- jobs ----------------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if message.delivery_tag is not None:
            self._acks.delivered(message.channel, message.delivery_tag)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            async with self._slots:
                if not self._started or self._paused:
                    # Stopping or paused: hand the job back untouched for another worker.
                    self.counters["requeued"] += 1
                    await self._settle(message, requeue=True)
                    return
                await self._process(message)
        except asyncio.CancelledError:
            # Stop grace ran out: give the job back so another worker runs it.
            self.counters["requeued"] += 1
            await self._settle(message, requeue=True)
            raise
        finally:
            if task is not None:
                self._tasks.discard(task)

    def _parse(self, message: AbstractIncomingMessage) -> Job:
        model = message.routing_key or ""
        job_id = message.message_id or message.correlation_id or "?"
        if len(message.body) > self.settings.worker.max_payload_bytes:
            raise _Failure(
                ErrorCode.INVALID_JOB,
                DeadReason.INVALID,
                f"job body is {len(message.body)} bytes, above worker.max_payload_bytes "
                f"({self.settings.worker.max_payload_bytes})",
                cause="too_large",
            )
        if message.content_type not in (None, "", "application/json"):
            raise _Failure(
                ErrorCode.INVALID_JOB,
                DeadReason.INVALID,
                f"content type {message.content_type!r} is not application/json",
                cause="content_type",
            )
        try:
            request = JobRequest.model_validate_json(message.body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise _Failure(
                ErrorCode.INVALID_JOB,
                DeadReason.INVALID,
                f"invalid job: {where}: {first['msg']}",
                cause="not_json" if first["type"] == "json_invalid" else "schema",
            ) from None
        if model and request.model != model and request.model not in self.models:
            raise _Failure(
                ErrorCode.INVALID_JOB,
                DeadReason.INVALID,
                f"job names model {request.model!r} but came from the queue of {model!r}",
                cause="wrong_model",
            )
        headers = message.headers or {}
        count = headers.get("x-delivery-count")
        # A first delivery is attempt 1 whatever its headers say: a producer can set
        # x-delivery-count itself, and the broker only overwrites it on a redelivery.
        if not message.redelivered:
            attempt = 1
        else:
            attempt = int(count) + 1 if isinstance(count, int) and count > 0 else 2
        return Job(
            job_id=job_id,
            model=request.model,
            payload=request.payload,
            deadline=request.deadline,
            stream=request.stream,
            attempt=attempt,
            sent_at=request.sent_at,
        )

    async def _process(self, message: AbstractIncomingMessage) -> None:
        model = message.routing_key or (self.models[0] if len(self.models) == 1 else "?")
        job_id = message.message_id or message.correlation_id or "?"
        started = time.monotonic()
        self._running[job_id] = started
        failure: _Failure | None = None
        cancelled = False
        result: Any = None
        chunks = 0
        try:
            job = self._parse(message)
            model = job.model
            self.cancels.check(job)  # cancelled while it waited: never started
            if job.sent_at is not None:
                self.stats.job_started(model, time.time() - job.sent_at)
            remaining = job.remaining()
            if remaining is not None and remaining <= 0:
                raise _Failure(
                    ErrorCode.EXPIRED,
                    DeadReason.EXPIRED,
                    "the producer's deadline passed before a worker could start the job",
                )
            result, chunks = await self.cancels.run(job_id, self._run_handler(job, message))
        except JobCancelled:
            cancelled = True
        except _Failure as caught:
            failure = caught
        except InvalidJobError as exc:
            failure = _Failure(ErrorCode.INVALID_JOB, DeadReason.INVALID, exc.message)
        except JobError as exc:  # a handler failing with a code of its own (modelfleet.upstream)
            failure = _Failure(
                exc.code, _DEAD_REASON_OF.get(exc.code, DeadReason.WORKER_ERROR), exc.message
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The traceback once a minute per exception type and model: a handler that fails on
            # every job must not flood the log (each failure is counted and dead-lettered).
            if self._time_to_log(f"raised:{type(exc).__name__}:{model}"):
                log.exception(
                    "worker %s: handler failed on job %s (%s); the traceback is logged at most "
                    "once a minute per exception type and model",
                    self.worker_id,
                    job_id,
                    model,
                )
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            failure = _Failure(
                ErrorCode.WORKER_ERROR, DeadReason.WORKER_ERROR, f"handler raised {text}"
            )
        finally:
            self._running.pop(job_id, None)
        if cancelled:
            # The producer is gone: no answer, no error copy; ack and free the slot.
            self.counters["cancelled"] += 1
            await self._settle(message)
            return
        if failure is None:
            reply = ResultReply(
                result=result,
                worker_id=self.worker_id,
                duration_s=time.monotonic() - started,
                chunks=chunks,
            )
            try:
                await self._reply(message, reply)
            except (TypeError, ValueError) as exc:  # the handler returned something not JSON-able
                failure = _Failure(
                    ErrorCode.WORKER_ERROR,
                    DeadReason.WORKER_ERROR,
                    f"handler result is not JSON-serialisable: {exc}",
                )
        self._account(model, failure, time.monotonic() - started)
        if failure is not None:
            await self._fail(message, model, job_id, failure)
            return
        await self._settle(message)

    def _account(self, model: str, failure: _Failure | None, duration_s: float) -> None:
        """Count a finished job in the heartbeat's counters and per-model statistics."""
        if failure is None:
            counter, outcome = "ok", Outcome.OK
        elif failure.reason == DeadReason.INVALID:
            counter, outcome = "invalid", Outcome.INVALID
        elif failure.code in (ErrorCode.EXPIRED, ErrorCode.WORKER_TIMEOUT):
            counter, outcome = "expired", Outcome.TIMEOUT
        else:
            counter, outcome = "worker_error", Outcome.WORKER_ERROR
        self.counters[counter] += 1
        self.stats.job_done(model, outcome, duration_s)

    async def _run_handler(self, job: Job, message: AbstractIncomingMessage) -> tuple[Any, int]:
        """Run the handler; returns (result, chunks sent)."""
        if self._kind == _HandlerKind.ASYNC:
            return await self._bounded(self.handler(job), job), 0
        if self._kind == _HandlerKind.THREAD:
            # A thread cannot be cancelled: it holds its slot until it returns, and shows up in
            # heartbeats as a stuck job if it never does.
            return await asyncio.to_thread(self.handler, job), 0
        streamed: tuple[Any, int] = await self._bounded(self._stream(job, message), job)
        return streamed

    async def _bounded(self, awaitable: Any, job: Job) -> Any:
        remaining = job.remaining()
        if remaining is None:
            return await awaitable
        try:
            async with asyncio.timeout(remaining):
                return await awaitable
        except TimeoutError:
            raise _Failure(
                ErrorCode.WORKER_TIMEOUT,
                DeadReason.EXPIRED,
                "the handler did not finish before the producer's deadline",
            ) from None

    async def _stream(self, job: Job, message: AbstractIncomingMessage) -> tuple[Any, int]:
        items: AsyncIterator[Any]
        if self._kind == _HandlerKind.ASYNC_GEN:
            items = self.handler(job)
        else:
            items = _iterate_in_thread(self.handler(job))
        seq = 0
        collected: list[Any] = []
        final: Any = None
        has_final = False
        async for item in items:
            if isinstance(item, Final):
                final, has_final = item.value, True
                break
            if job.stream:
                # The first chunk goes out at once: time to first token is what a user waits on.
                await self._reply(message, ChunkReply(seq=seq, data=item), flush=seq == 0)
                if seq == 0 and job.sent_at is not None:
                    # Time to first chunk as the producer sees it: from publish, queue included.
                    self.stats.first_chunk(job.model, time.time() - job.sent_at)
            else:
                collected.append(item)
            seq += 1
        if isinstance(items, _ThreadIterator) and items.returned is not None and not has_final:
            final, has_final = items.returned, True
        if not has_final and not job.stream:
            final = collected
        return final, seq if job.stream else 0

    async def _reply(
        self, message: AbstractIncomingMessage, reply: BaseModel, *, flush: bool = False
    ) -> None:
        if not message.reply_to or self._channel is None:
            return
        body = reply.model_dump_json().encode()
        properties = reply_properties(
            message.correlation_id or message.message_id, getattr(reply, "kind", "reply")
        )
        await publish(
            self._channel, body, properties, exchange="", routing_key=message.reply_to, flush=flush
        )

    def _time_to_log(self, cause: str) -> bool:
        """True at most once every LOG_CAUSE_EVERY_S per ``cause``: a fault that hits every job
        is logged, not repeated per job (each job is still counted and dead-lettered)."""
        now = time.monotonic()
        logged = self._logged_causes.get(cause)
        if logged is not None and now - logged < LOG_CAUSE_EVERY_S:
            return False
        self._logged_causes[cause] = now
        return True

    async def _fail(
        self, message: AbstractIncomingMessage, model: str, job_id: str, failure: _Failure
    ) -> None:
        """Error reply to the producer, copy to the error queue with the reason, then ack."""
        if self._time_to_log(failure.cause):
            log.warning(
                "job %s (%s) failed: %s (%s): %s (logged at most once a minute per cause)",
                job_id,
                model,
                failure.reason,
                failure.cause,
                failure.message,
            )
        with contextlib.suppress(Exception):
            await self._reply(
                message, ErrorReply.build(failure.code, failure.message, model=model, job_id=job_id)
            )
        copy = dead_copy(message, reason=failure.reason, error=failure.message, model=model)
        try:
            assert self._dead_exchange is not None
            await self._dead_exchange.publish(copy, routing_key=model, mandatory=False)
        except Exception as exc:
            # Fall back to the broker's own dead-lettering (reason "rejected").
            log.warning("job %s: copy to the error queue failed (%s); rejecting", job_id, exc)
            await self._settle(message, reject=True)
            return
        await self._settle(message)

    async def _settle(
        self, message: AbstractIncomingMessage, *, requeue: bool = False, reject: bool = False
    ) -> None:
        tag = message.delivery_tag
        if not requeue and not reject and tag is not None:
            self._acks.ack(message.channel, tag)  # batched: written on the next loop turn
            return
        if tag is not None:
            self._acks.settled(message.channel, tag)
        try:
            if requeue:
                await message.nack(requeue=True)
            else:
                await message.reject(requeue=False)
        except Exception as exc:
            # The delivery's channel died: the broker has already requeued the job, and an ack
            # on the new channel would be for a delivery tag it never issued.
            log.info("job %s: not settled (%s); the broker requeued it", message.message_id, exc)


class _ThreadIterator:
    """Drive a plain generator from a thread, one item at a time."""

    def __init__(self, iterator: Iterator[Any]) -> None:
        self._iterator = iterator
        self.returned: Any = None

    def __aiter__(self) -> _ThreadIterator:
        return self

    def _next(self) -> Any:
        try:
            return next(self._iterator)
        except StopIteration as stop:
            self.returned = stop.value
            return _STREAM_END

    async def __anext__(self) -> Any:
        item = await asyncio.to_thread(self._next)
        if item is _STREAM_END:
            raise StopAsyncIteration
        return item


def _iterate_in_thread(iterator: Iterator[Any]) -> _ThreadIterator:
    return _ThreadIterator(iterator)


EXIT_STUCK = 75  # EX_TEMPFAIL: a supervisor should restart the worker


def _exit_process() -> None:
    logging.shutdown()
    os._exit(EXIT_STUCK)
