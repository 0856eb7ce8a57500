"""The chaos soak: jobs from several producers while workers, the controller and the broker fail.

Jepsen-style: inject faults, then account for every job. Each job carries a key; the handler
records every execution of a key (tests/chaos/handlers.py); the producer records its outcome and
how long it waited; at the end the error queue is read. A job is *lost* when it neither ran nor
reached the error queue and its producer was not told that it went nowhere (WITHDRAWN_MARKERS).
A producer is *overdue* when it waited past its own timeout.

    python -m tests.chaos.soak --jobs 5000          # `make chaos`: the schedule twice
    python -m tests.chaos.soak --quick              # the CI form (400 jobs, the schedule once)

Faults, one after the other while jobs flow (a quarter of them streams):

* a worker SIGKILLed and restarted with its old ``--worker-id`` (the controller must show the new
  pid within SHOWN_BOUND_S of its first heartbeat); one SIGSTOPped for 3 s;
* channel-level errors: ``{ns}.jobs``, ``{ns}.heartbeats`` and ``{ns}.dead`` deleted under
  clients, workers and the controller (re-declared by the soak if nobody did within 2 s);
* consumer cancels: the controller's heartbeat queue and dead-letter tap deleted, every worker's
  control queue deleted, and the (empty) queue of the model ``chaos-idle`` deleted and declared
  again; that model gets its jobs only afterwards, so the workers must consume it again;
* the controller restarted; the broker restarted (rabbitmqctl stop_app/start_app);
* a real death of most of the fleet: 3 of 4 workers SIGKILLed at once and kept dead past the
  heartbeat timeout (the controller must evict them within EVICT_BOUND_S), then restarted;
* a worker SIGKILLed in the middle of streams;
* a rolling restart: each worker SIGTERMed in turn under extra load, its replacement up before
  the next.

The ledger adds: *spliced streams* (chunks or result from more than one execution), *false
failures* (WORKER_ERROR or a worker_error/delivery_limit copy for a job whose handler never
raised, unless every run of it died with its worker, delivery_limit times), *components that
never recovered* (at the end, within RECOVERY_S: every worker registered, ready, with its current
pid, and consuming each of its model queues and its control queue; the controller healthy,
consuming its heartbeat, dead-letter and unroutable queues, with every binding in place; each
producer's own client answering a fresh job) and *fault checks failed* (the bounds above, and the
same recovery checks right after each channel error, consumer cancel and controller or broker
restart, before a later fault could heal anything). Restarts come first in the schedule for that
reason. The long form (``make chaos``) runs the schedule once per 2,500 jobs.

The soak restarts its broker: run it on a node of its own. ``CHAOS_NODE`` (or
``--node``) names the node for rabbitmqctl; its AMQP listener must be the URL's port, or the soak
refuses to start. ``tests/chaos/own_broker.sh start`` starts one (soak@localhost, port 5679).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfleet import Client, JobError
from modelfleet.config import Settings, settings_from_mapping
from modelfleet.topology import Names, Topology, dead_reason
from tests.chaos.fleet import (
    Fleet,
    HeartbeatTap,
    Node,
    Status,
    exchange_exists,
    free_port,
    on_channel,
    queue_counts,
    until,
)
from tests.chaos.handlers import STREAM_CHUNKS

log = logging.getLogger("chaos")

MODELS = ("chaos-a", "chaos-b")
# Served by every worker, empty until its queue has been deleted and declared again.
IDLE_MODEL = "chaos-idle"
SERVED = (*MODELS, IDLE_MODEL)
WORKERS = 4
CONCURRENCY = 4
TIMEOUT_S = 15.0
# Each job takes this long on a worker, so killed workers really die holding jobs.
WORK_S = 0.2
# During the rolling restart jobs take longer and producers do not pause: workers then hold
# deliveries waiting for a slot, which a stopping worker hands back.
HOT_WORK_S = 2.0
HOT_SHARE = 0.15
STREAM_EVERY = 4  # every 4th job is a stream
IDLE_JOBS = 12
# What the client says of a job it did not get into a queue (publish refused or never confirmed,
# jobs exchange missing), or cancelled itself after its channel closed: its producer knows the job
# went nowhere, so a job that then never ran is not lost. (The client's wording is the only sign.)
WITHDRAWN_MARKERS = (
    "was not sent",
    "was not queued",
    "may not have been queued",
    "the job was cancelled",
)
# A producer may notice its deadline a little late (event loop busy, GC): this much is not overdue.
OVERDUE_SLACK_S = 1.0
HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_TIMEOUT_S = 2.0
STOP_GRACE_S = 5.0
HEARTBEAT_SWEEP_S = 0.5
# The README's bound for a real mass death, timeout + interval + sweep after the last heartbeat
# (the kill comes after it), with 1 s to spare for a busy machine.
EVICT_BOUND_S = HEARTBEAT_TIMEOUT_S + HEARTBEAT_INTERVAL_S + HEARTBEAT_SWEEP_S + 1.0
# A restarted worker (same id) is listed with its new pid this soon after its first heartbeat:
# "accepted at once" (issue 10), not once its old entry has timed out.
SHOWN_BOUND_S = 2 * HEARTBEAT_INTERVAL_S
# After the faults, every component serves again within this.
RECOVERY_S = 10.0
GAP_S = 1.0
# Seconds each fault takes, to pace the producers over the whole schedule.
_ESTIMATE_S = {
    "kill": 3.0,
    "stop": 3.0,
    "controller": 3.5,
    "broker": 3.0,
    "exchange:jobs": 2.2,
    "exchange:heartbeats": 2.2,
    "exchange:dead": 2.2,
    "cancel:controller": 1.0,
    "cancel:workers": 1.5,
    "cancel:model": 1.0,
    "mass-death": 6.0,
    "midstream": 2.5,
    "rolling": 6.0,
}
# Faults that heal others (restarts) come first, so that a component a channel error or a
# consumer cancel broke for good is still broken at the end.
SCHEDULE = (
    "kill",
    "stop",
    "controller",
    "broker",
    "mass-death",
    "rolling",
    "midstream",
    "exchange:jobs",
    "midstream",
    "exchange:heartbeats",
    "cancel:controller",
    "cancel:workers",
    "exchange:dead",
    "cancel:model",
)
# After these, every component must serve again within RECOVERY_S (checked at once, before the
# next fault can heal anything).
VERIFIED = frozenset(
    {
        "controller",
        "broker",
        "exchange:jobs",
        "exchange:heartbeats",
        "exchange:dead",
        "cancel:controller",
        "cancel:workers",
        "cancel:model",
    }
)
# Later rounds of the long form: one more controller restart; the idle model's queue is deleted
# once only (its jobs come once).
LATER_ROUND = ("controller", *(f for f in SCHEDULE if f != "cancel:model"))
# What the CI form asserts ran.
FAULT_CLASSES = (
    "sigkill",
    "same-id-restart",
    "sigstop",
    "controller-restart",
    "broker-restart",
    "channel-error:jobs",
    "channel-error:heartbeats",
    "channel-error:dead",
    "consumer-cancel:controller",
    "consumer-cancel:workers",
    "consumer-cancel:model",
    "mass-death",
    "mid-stream-kill",
    "rolling-restart",
)


@dataclass
class Ledger:
    submitted: int = 0
    streams: int = 0
    answered: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    not_sent: int = 0
    not_sent_ran: int = 0
    failed_ran: Counter[str] = field(default_factory=Counter)
    in_errors: Counter[str] = field(default_factory=Counter)
    executed_once: int = 0
    duplicates: int = 0
    lost: list[str] = field(default_factory=list)
    overdue: list[tuple[str, float]] = field(default_factory=list)
    wrong_answers: list[str] = field(default_factory=list)
    spliced: list[str] = field(default_factory=list)
    false_failures: list[str] = field(default_factory=list)
    never_recovered: dict[str, str] = field(default_factory=dict)
    fault_checks: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    classes: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def missing_classes(self) -> list[str]:
        return [name for name in FAULT_CLASSES if not self.classes[name]]

    @property
    def passed(self) -> bool:
        return not (
            self.lost
            or self.overdue
            or self.wrong_answers
            or self.spliced
            or self.false_failures
            or self.never_recovered
            or self.fault_checks
            or self.missing_classes
            or any(k.startswith(("EXC", "MISSING")) for k in self.failed)
        )

    def render(self) -> str:
        recovered = [f"{name}: {why}" for name, why in sorted(self.never_recovered.items())]
        lines = [
            "chaos soak ledger",
            f"  jobs submitted                   {self.submitted}  (streams {self.streams})",
            f"  answered                         {self.answered}",
            f"  failed with a code               {sum(self.failed.values())}  {dict(self.failed)}",
            f"    of which ran anyway            {sum(self.failed_ran.values())}  "
            f"{dict(self.failed_ran)}",
            f"    of which withdrawn             {self.not_sent}  (never sent, or cancelled by the "
            f"client after its channel closed; producer told; ran anyway: {self.not_sent_ran})",
            f"  in the error queue               {sum(self.in_errors.values())}  "
            f"{dict(self.in_errors)}",
            f"  executed once                    {self.executed_once}",
            f"  executed more than once          {self.duplicates}  (at-least-once redeliveries)",
            f"  wrong answers                    {len(self.wrong_answers)}  "
            f"{self.wrong_answers[:5]}",
            f"  LOST                             {len(self.lost)}  {self.lost[:10]}",
            f"  producers overdue                {len(self.overdue)}  {self.overdue[:5]}",
            f"  spliced streams                  {len(self.spliced)}  {self.spliced[:5]}",
            f"  false failures                   {len(self.false_failures)}  "
            f"{self.false_failures[:5]}",
            f"  components that never recovered  {len(self.never_recovered)}  {recovered}",
            f"  fault checks failed              {len(self.fault_checks)}  {self.fault_checks}",
            f"  fault classes not run            {len(self.missing_classes)}  "
            f"{self.missing_classes}",
            f"  faults injected                  {len(self.faults)}:",
            *(f"    - {fault}" for fault in self.faults),
            f"  wall time                        {self.seconds:.1f}s",
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class JobSpec:
    key: str
    model: str
    stream: bool


# -- producers ------------------------------------------------------------------------------


class Pacer:
    """Spreads the jobs evenly up to ``end``, which follows the fault schedule (it may run
    longer or shorter than planned): one job starts per turn, whichever lane is free. ``hot``
    (the rolling restart) sends slow jobs without pauses, within a budget of jobs."""

    def __init__(self, remaining: int, hot_budget: int) -> None:
        self.remaining = remaining
        self.end = time.monotonic()
        self.hot = False
        self.hot_budget = hot_budget
        self._next = 0.0

    def take_hot(self) -> bool:
        if self.hot and self.hot_budget > 0:
            self.hot_budget -= 1
            return True
        return False

    async def turn(self) -> None:
        """Wait for this lane's turn to start a job."""
        if self.hot and self.hot_budget > 0:
            return
        now = time.monotonic()
        left = self.end - now
        interval = left / self.remaining if left > 0 and self.remaining > 0 else 0.0
        slot = min(max(now, self._next), now + max(left, 0.0))
        self._next = slot + interval
        await asyncio.sleep(slot - now)


def judge_stream(key: str, chunks: list[Any], result: Any) -> str:
    """``SPLICED`` when the chunks and result carry more than one execution's nonce, ``ok`` when
    they are exactly one execution's, ``wrong`` otherwise (missing, repeated or foreign chunks)."""
    nonces = {c.get("n") for c in chunks if isinstance(c, dict)}
    if isinstance(result, dict):
        nonces.add(result.get("n"))
    if len(nonces) > 1:
        return "SPLICED"
    nonce = next(iter(nonces), None)
    expected = [{"k": key, "i": i, "n": nonce} for i in range(STREAM_CHUNKS)]
    if chunks == expected and result == {"k": key, "n": nonce, "chunks": STREAM_CHUNKS}:
        return "ok"
    return "wrong"


async def _run_job(client: Client, job: JobSpec, hot: bool, messages: dict[str, str]) -> str:
    """Run one job; its outcome, and in ``messages`` what its producer was told if it failed."""
    payload: dict[str, Any] = {"k": job.key, "work": HOT_WORK_S if hot else WORK_S}
    if hot:
        payload["chunk_s"] = HOT_WORK_S / STREAM_CHUNKS
    try:
        if not job.stream:
            result = await client.submit(job.model, payload, timeout=TIMEOUT_S)
            return "ok" if result == {"k": job.key} else "wrong"
        async with client.stream(job.model, payload, timeout=TIMEOUT_S) as stream:
            chunks = [chunk async for chunk in stream]
        return judge_stream(job.key, chunks, stream.result)
    except JobError as exc:
        messages[job.key] = exc.message[:200]
        if any(marker in exc.message for marker in WITHDRAWN_MARKERS):
            return f"WITHDRAWN:{exc.code.name}"  # the producer was told it went nowhere
        return exc.code.name
    except Exception as exc:  # anything else is a bug the ledger must show
        messages[job.key] = repr(exc)[:200]
        return f"EXC:{type(exc).__name__}"


async def _produce(
    client: Client,
    jobs: list[JobSpec],
    outcomes: dict[str, tuple[str, float]],
    messages: dict[str, str],
    lanes: int,
    pacer: Pacer,
) -> None:
    queue: asyncio.Queue[JobSpec] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def one_lane() -> None:
        while not queue.empty():
            await pacer.turn()
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            pacer.remaining -= 1
            started = time.monotonic()
            outcome = await _run_job(client, job, pacer.take_hot(), messages)
            outcomes[job.key] = (outcome, time.monotonic() - started)
            SPANS[job.key] = (started, time.monotonic())

    await asyncio.gather(*(one_lane() for _ in range(lanes)))


# -- the soak -------------------------------------------------------------------------------


class Soak:
    def __init__(
        self,
        url: str,
        *,
        jobs: int,
        producers: int,
        lanes: int,
        duration_s: float,
        rounds: int,
        broker_restart: bool,
        node: str | None,
    ) -> None:
        self.url = url
        self.node = Node(node)
        self.namespace = f"chaos-{uuid.uuid4().hex[:8]}"
        self.names = Names(self.namespace)
        self.logs = Path(tempfile.mkdtemp(prefix="modelfleet-chaos-"))
        self.http_port = free_port()
        self.env = {
            **os.environ,
            "CHAOS_LOG_DIR": str(self.logs),
            "MODELFLEET_NAMESPACE": self.namespace,
            "MODELFLEET_AMQP__URL": url,
            "MODELFLEET_HTTP__PORT": str(self.http_port),
            "MODELFLEET_HEARTBEAT__INTERVAL": str(HEARTBEAT_INTERVAL_S),
            "MODELFLEET_HEARTBEAT__TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
            "MODELFLEET_HEARTBEAT__SWEEP_INTERVAL_S": str(HEARTBEAT_SWEEP_S),
            "MODELFLEET_ROUTING__NO_WORKER_GRACE_S": "2",
            # Time compressed like the heartbeats: the controller re-asserts its bindings every
            # 10 stats rounds, 5 s here (20 s with the default 2 s).
            "MODELFLEET_ROUTING__STATS_INTERVAL_S": "0.5",
            "MODELFLEET_WORKER__STOP_GRACE_S": str(STOP_GRACE_S),
            # An existing PYTHONPATH first: a checkout's src/ can be tested this way.
            "PYTHONPATH": os.pathsep.join(
                p for p in (os.environ.get("PYTHONPATH"), os.getcwd()) if p
            ),
        }
        self.settings: Settings = settings_from_mapping(
            {"namespace": self.namespace, "amqp": {"url": url}, "client": {"timeout_s": TIMEOUT_S}}
        )
        self.topology = Topology(self.names, self.settings.routing, self.settings.heartbeat)
        self.delivery_limit = self.settings.routing.delivery_limit
        self.producers = producers
        self.lanes = lanes
        self.duration_s = duration_s
        self.schedule: list[str] = list(SCHEDULE)
        for _ in range(rounds - 1):
            self.schedule += LATER_ROUND
        if not broker_restart:
            self.schedule = ["kill" if f == "broker" else f for f in self.schedule]
        self.jobs = [
            JobSpec(
                f"{'s' if i % STREAM_EVERY == 0 else 'j'}{i:06d}",
                MODELS[(i + i // STREAM_EVERY) % len(MODELS)],
                i % STREAM_EVERY == 0,
            )
            for i in range(jobs)
        ]
        self.idle_jobs = [JobSpec(f"i{i:06d}", IDLE_MODEL, i % 3 == 0) for i in range(IDLE_JOBS)]
        self.stream_keys = {j.key for j in [*self.jobs, *self.idle_jobs] if j.stream}
        self.ledger = Ledger(
            submitted=len(self.jobs) + len(self.idle_jobs),
            streams=sum(j.stream for j in [*self.jobs, *self.idle_jobs]),
        )
        self.fleet = Fleet(self.env, self.logs, models=SERVED, concurrency=CONCURRENCY)
        self.status = Status(self.http_port)
        self.tap = HeartbeatTap(url, self.names)
        self.clients: list[Client] = []
        self.outcomes: dict[str, tuple[str, float]] = {}
        self.messages: dict[str, str] = {}  # what the producer of each failed job was told
        self.rng = random.Random(7)
        self.pacer = Pacer(jobs, max(40, int(jobs * HOT_SHARE)))
        self.idle_gate = asyncio.Event()
        self.idle_deleted = False
        self.started = time.monotonic()
        self._faults: dict[str, Callable[[], Awaitable[None]]] = {
            "kill": self._kill,
            "stop": self._stop,
            "controller": self._restart_controller,
            "broker": self._restart_broker,
            "exchange:jobs": lambda: self._delete_exchange("jobs"),
            "exchange:heartbeats": lambda: self._delete_exchange("heartbeats"),
            "exchange:dead": lambda: self._delete_exchange("dead"),
            "cancel:controller": self._cancel_controller,
            "cancel:workers": self._cancel_workers,
            "cancel:model": self._cancel_model,
            "mass-death": self._mass_death,
            "midstream": self._kill_mid_stream,
            "rolling": self._rolling_restart,
        }

    # -- run ------------------------------------------------------------------------------

    async def run(self) -> Ledger:
        await asyncio.to_thread(self.node.check_serves, self.url)
        started = self.started = time.monotonic()
        errors: dict[str, list[str]] = {}
        try:
            try:
                await self._run()
            finally:
                for client in self.clients:
                    with contextlib.suppress(Exception):
                        await client.close()
                await self.tap.close()
                await self.status.close()
                self.fleet.stop_all()
                log.info("fleet stopped after %.1fs", time.monotonic() - started)
                if self.node.app_stopped:
                    await asyncio.to_thread(self.node.ctl, "start_app")
            self.ledger.seconds = time.monotonic() - started
            errors = await self._read_errors()
        finally:
            with contextlib.suppress(Exception):
                await on_channel(self.url, lambda ch: self.topology.delete(ch, list(SERVED)))
        self._account(errors)
        return self.ledger

    async def _run(self) -> None:
        self.fleet.start_controller()
        for index in range(WORKERS):
            self.fleet.start_worker(f"w{index}")
        self.clients = [Client(self.settings) for _ in range(self.producers)]
        for client in self.clients:
            await client.connect()
        await self._wait_ready()
        await self.tap.open()
        log.info("fleet ready after %.1fs", time.monotonic() - self.started)
        share = [self.jobs[i :: self.producers] for i in range(self.producers)]
        self.pacer.end = time.monotonic() + max(self.duration_s, self._estimate(self.schedule))
        work = [
            self._logged(
                _produce(client, part, self.outcomes, self.messages, self.lanes, self.pacer)
            )
            for client, part in zip(self.clients, share, strict=True)
        ]
        await asyncio.gather(self._inject(), self._produce_idle(), *work)
        log.info("faults and jobs done after %.1fs", time.monotonic() - self.started)
        # Meanwhile expired jobs reach the error queue (TTL dead-lettering happens at the queue
        # head).
        await self._check_recovery()
        log.info("recovery checked after %.1fs", time.monotonic() - self.started)

    async def _logged(self, producer: Awaitable[None]) -> None:
        await producer
        log.info("a producer done after %.1fs", time.monotonic() - self.started)

    @staticmethod
    def _estimate(schedule: Iterable[str]) -> float:
        """Seconds the faults in ``schedule`` should take, gaps included."""
        items = list(schedule)
        return sum(_ESTIMATE_S[f] for f in items) + GAP_S * len(items)

    async def _wait_ready(self) -> None:
        """Until both busy models answer and the controller lists every worker."""
        deadline = time.monotonic() + 60
        client = self.clients[0]
        for model in MODELS:
            while True:
                try:
                    await client.submit(model, {"k": "warmup", "work": 0}, timeout=2)
                    break
                except JobError:
                    self.fleet.check_alive()
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)

        async def listed() -> bool:
            workers = await self.status.workers() or []
            return {w["worker_id"] for w in workers} >= set(self.fleet.workers)

        if await until(listed, max(1.0, deadline - time.monotonic())) is None:
            raise RuntimeError("the controller never listed every worker")

    async def _inject(self) -> None:
        """Run the schedule; the producers stretch their pace when it runs late."""
        try:
            slot_end = time.monotonic()
            spare = max(0.0, self.duration_s - self._estimate(self.schedule)) / len(self.schedule)
            for index, fault in enumerate(self.schedule):
                await asyncio.sleep(max(GAP_S, slot_end + spare - time.monotonic()))
                self._pace(self.schedule[index:], spare, fault in VERIFIED)
                try:
                    await self._faults[fault]()
                    if fault in VERIFIED:
                        # A slow recovery must not leave the rest of the schedule without jobs.
                        self._pace(self.schedule[index + 1 :], spare, True)
                        await self._verify(fault)
                        self._pace(self.schedule[index + 1 :], spare, False)
                except Exception as exc:
                    log.exception("fault %s failed", fault)
                    self.ledger.fault_checks.append(f"{fault}: the soak's injection raised {exc!r}")
                slot_end = time.monotonic()
        finally:
            self.pacer.hot = False
            self.idle_gate.set()
            log.info("faults done after %.1fs", time.monotonic() - self.started)

    def _pace(self, faults: list[str], spare: float, verifying: bool) -> None:
        """Spread the jobs left over ``faults`` (and a recovery check that may take all of
        RECOVERY_S), and a little past the last one."""
        rest = self._estimate(faults) + spare * len(faults) + 5.0 + verifying * RECOVERY_S
        self.pacer.end = time.monotonic() + rest

    async def _produce_idle(self) -> None:
        """The idle model's jobs, once its queue was deleted and declared again."""
        await self.idle_gate.wait()
        if not self.idle_deleted:
            return  # left MISSING: the ledger shows the fault did not run

        async def one(index: int, job: JobSpec) -> None:
            started = time.monotonic()
            client = self.clients[index % len(self.clients)]
            outcome = await _run_job(client, job, False, self.messages)
            self.outcomes[job.key] = (outcome, time.monotonic() - started)
            SPANS[job.key] = (started, time.monotonic())

        await asyncio.gather(*(one(i, job) for i, job in enumerate(self.idle_jobs)))
        log.info("idle model's jobs done after %.1fs", time.monotonic() - self.started)

    # -- faults: processes ----------------------------------------------------------------

    def _note(self, klass: str, text: str) -> None:
        self.ledger.classes[klass] += 1
        self.ledger.faults.append(f"[+{time.monotonic() - self.started:.0f}s] {text}")

    async def _restart_and_check(self, worker_ids: list[str]) -> str:
        """Start each worker again under its old id; the controller must list the new pid
        within SHOWN_BOUND_S of the new process's first heartbeat."""
        procs = {wid: self.fleet.start_worker(wid) for wid in worker_ids}
        delays = await asyncio.gather(*(self._shown(wid, proc) for wid, proc in procs.items()))
        return ", ".join(
            f"{wid} pid {procs[wid].pid} listed {'never' if d is None else f'{d:.2f}s'}"
            for wid, d in zip(worker_ids, delays, strict=True)
        )

    async def _shown(self, worker_id: str, proc: subprocess.Popen[bytes]) -> float | None:
        key = (worker_id, proc.pid)

        async def spoke() -> bool:
            return key in self.tap.first or proc.poll() is not None

        if await until(spoke, 30.0, 0.05) is None or key not in self.tap.first:
            self.ledger.fault_checks.append(
                f"worker {worker_id} pid {proc.pid} sent no heartbeat within 30s of its start"
            )
            return None
        first = self.tap.first[key]

        async def listed() -> bool:
            workers = await self.status.workers() or []
            return any(
                w.get("worker_id") == worker_id and w.get("pid") == proc.pid
                for w in workers
                if w.get("state") == "ready"
            )

        waited = await until(listed, SHOWN_BOUND_S + 10.0)
        delay = None if waited is None else time.monotonic() - first
        if delay is None or delay > SHOWN_BOUND_S:
            figure = "never (10s past the bound)" if delay is None else f"after {delay:.1f}s"
            self.ledger.fault_checks.append(
                f"restarted worker {worker_id} (same id) listed with its new pid {figure}; "
                f"bound {SHOWN_BOUND_S:g}s after its first heartbeat"
            )
        return delay

    async def _kill(self) -> None:
        worker_id = self.rng.choice(sorted(self.fleet.workers))
        pid = await self.fleet.kill(worker_id)
        detail = await self._restart_and_check([worker_id])
        self._note("sigkill", f"SIGKILL worker {worker_id} (pid {pid}); restarted: {detail}")
        self.ledger.classes["same-id-restart"] += 1

    async def _stop(self) -> None:
        worker_id = self.rng.choice(sorted(self.fleet.workers))
        victim = self.fleet.workers[worker_id]
        victim.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(3.0)
        finally:
            victim.send_signal(signal.SIGCONT)
        self._note("sigstop", f"SIGSTOP 3s worker {worker_id} (pid {victim.pid})")

    async def _restart_controller(self) -> None:
        old = self.fleet.controller
        assert old is not None
        old.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(old.wait, 20)
        except subprocess.TimeoutExpired:
            old.kill()
            self.ledger.fault_checks.append(f"controller pid {old.pid} ignored SIGTERM for 20s")
        self.fleet.start_controller()
        healthy = await until(self.status.healthy, 20.0)
        if healthy is None:
            self.ledger.fault_checks.append("restarted controller not healthy within 20s")
        figure = "never" if healthy is None else f"{healthy:.1f}s"
        self._note("controller-restart", f"controller restart (healthy after {figure})")

    async def _restart_broker(self) -> None:
        self.fleet.deaths.append(time.monotonic())  # every held delivery goes back
        await asyncio.to_thread(self.node.ctl, "stop_app")
        self.node.app_stopped = True
        await asyncio.sleep(2.0)
        await asyncio.to_thread(self.node.ctl, "start_app")
        self.node.app_stopped = False
        self._note("broker-restart", "broker restart (stop_app/start_app)")

    async def _mass_death(self) -> None:
        """SIGKILL 3 of the 4 workers at once; with the broker healthy the controller must evict
        them within EVICT_BOUND_S; they stay dead past the heartbeat timeout, then come back
        under their old ids."""
        victims = self.rng.sample(sorted(self.fleet.workers), WORKERS - 1)
        pids = await asyncio.gather(*(self.fleet.kill(wid) for wid in victims))
        killed_at = time.monotonic()

        async def evicted() -> bool:
            workers = await self.status.workers()
            return workers is not None and not any(w.get("worker_id") in victims for w in workers)

        waited = await until(evicted, EVICT_BOUND_S + 3.0)
        if waited is None or waited > EVICT_BOUND_S:
            figure = "still listed" if waited is None else f"evicted only after {waited:.1f}s"
            self.ledger.fault_checks.append(
                f"mass death: {len(victims)} of {WORKERS} workers SIGKILLed, {figure} "
                f"(bound {EVICT_BOUND_S:g}s: timeout + interval + sweep + 1s)"
            )
        await asyncio.sleep(max(0.0, killed_at + HEARTBEAT_TIMEOUT_S + 3.0 - time.monotonic()))
        detail = await self._restart_and_check(victims)
        figure = "never" if waited is None else f"{waited:.1f}s"
        self._note(
            "mass-death",
            f"SIGKILL {len(victims)} of {WORKERS} workers at once ({', '.join(victims)}, pids "
            f"{', '.join(map(str, pids))}); evicted after {figure}; restarted: {detail}",
        )
        self.ledger.classes["same-id-restart"] += 1

    def _open_streams(self, pid: int) -> int:
        path = self.logs / f"executed-{pid}.log"
        if not path.exists():
            return 0
        started: set[str] = set()
        ended: set[str] = set()
        for line in path.read_text().splitlines():
            if line.startswith("end "):
                ended.add(line[4:])
            elif line in self.stream_keys:
                started.add(line)
        return len(started - ended)

    async def _kill_mid_stream(self) -> None:
        choice: tuple[str, int] | None = None

        async def streaming() -> bool:
            nonlocal choice
            counts = {wid: self._open_streams(p.pid) for wid, p in self.fleet.workers.items()}
            wid, count = max(counts.items(), key=lambda item: item[1])
            choice = (wid, count)
            return count > 0

        await until(streaming, 8.0, 0.05)
        assert choice is not None
        worker_id, running = choice
        if not running:
            worker_id = self.rng.choice(sorted(self.fleet.workers))
        pid = await self.fleet.kill(worker_id)
        detail = await self._restart_and_check([worker_id])
        text = f"SIGKILL worker {worker_id} (pid {pid}) with {running} stream(s) running"
        if running:
            self._note("mid-stream-kill", f"{text}; restarted: {detail}")
        else:
            self._note("sigkill", f"{text} (no stream was running); restarted: {detail}")
        self.ledger.classes["same-id-restart"] += 1

    async def _rolling_restart(self) -> None:
        """SIGTERM each worker in turn under extra load; start its replacement (same id) and
        wait until it is listed before the next."""
        self.pacer.hot = True
        details = []
        try:
            for worker_id in sorted(self.fleet.workers):
                proc = self.fleet.workers[worker_id]
                began = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                try:
                    code = await asyncio.to_thread(proc.wait, STOP_GRACE_S + 10)
                except subprocess.TimeoutExpired:
                    self.fleet.killed.add(proc.pid)
                    self.fleet.deaths.append(time.monotonic())
                    proc.kill()
                    code = await asyncio.to_thread(proc.wait)
                    self.ledger.fault_checks.append(
                        f"rolling restart: worker {worker_id} did not exit within "
                        f"{STOP_GRACE_S + 10:g}s of SIGTERM"
                    )
                if code != 0:
                    self.ledger.fault_checks.append(
                        f"rolling restart: worker {worker_id} exited {code} on SIGTERM"
                    )
                exited = time.monotonic() - began
                restarted = await self._restart_and_check([worker_id])
                details.append(f"{worker_id} exit {code} after {exited:.1f}s, {restarted}")
        finally:
            self.pacer.hot = False
        self._note("rolling-restart", "rolling restart (SIGTERM) under load: " + "; ".join(details))

    # -- faults: channel errors and consumer cancels --------------------------------------

    async def _delete_exchange(self, which: str) -> None:
        name = str(getattr(self.names, which))
        await on_channel(self.url, lambda ch: ch.exchange_delete(name))
        deleted_at = time.monotonic()

        async def exists() -> bool:
            return await exchange_exists(self.url, name)

        back = await until(exists, 2.0, 0.2)
        if back is None:
            await on_channel(self.url, self.topology.declare_base)
            by = f"the soak after {time.monotonic() - deleted_at:.1f}s"
        else:
            by = f"the fleet after {back:.1f}s"
        if which == "heartbeats":
            await self.tap.rebind()
        self._note(f"channel-error:{which}", f"exchange {name} deleted (declared again by {by})")

    async def _delete_queues(self, prefixes: tuple[str, ...]) -> list[str]:
        rows = await asyncio.to_thread(self.node.rows, "list_queues", "name")
        victims = sorted(
            str(r["name"]) for r in rows if str(r.get("name", "")).startswith(prefixes)
        )

        async def delete(channel: Any) -> None:
            for name in victims:
                await channel.queue_delete(name)

        await on_channel(self.url, delete)
        return victims

    async def _cancel_controller(self) -> None:
        prefixes = (f"{self.names.ns}.controller.", f"{self.names.ns}.dead.tap.")
        victims = await self._delete_queues(prefixes)
        if not victims:
            self.ledger.fault_checks.append("no controller heartbeat queue or tap to delete")
        self._note(
            "consumer-cancel:controller",
            f"controller's queues deleted under its consumers: {', '.join(victims)}",
        )

    async def _cancel_workers(self) -> None:
        victims = await self._delete_queues((f"{self.names.ns}.control.",))
        if len(victims) < WORKERS:
            self.ledger.fault_checks.append(f"only {len(victims)} worker control queues found")
        self._note(
            "consumer-cancel:workers",
            f"{len(victims)} worker control queues deleted under their consumers",
        )

    async def _cancel_model(self) -> None:
        """Delete the idle model's (empty) queue under its consumers and declare it again; the
        workers must consume it again on their own before its jobs come."""
        name = self.names.model_queue(IDLE_MODEL)
        counts = await queue_counts(self.url, name)
        if counts is None or counts[0]:
            # Only an empty queue: deleting jobs is not a fault the fleet could recover from.
            self.ledger.fault_checks.append(
                f"queue {name} not deletable: {counts} (ready, consumers)"
            )
            return
        await on_channel(self.url, lambda ch: ch.queue_delete(name))
        deleted_at = time.monotonic()

        async def exists() -> bool:
            return await queue_counts(self.url, name) is not None

        back = await until(exists, 2.0, 0.2)
        if back is None:
            await on_channel(self.url, lambda ch: self.topology.declare_model_queue(ch, IDLE_MODEL))
            by = f"the soak after {time.monotonic() - deleted_at:.1f}s"
        else:
            by = f"the fleet after {back:.1f}s"

        async def consumed() -> bool:
            now = await queue_counts(self.url, name)
            return now is not None and now[1] >= len(self.fleet.workers)

        again = await until(consumed, RECOVERY_S, 0.2)
        figure = f"after {again:.1f}s" if again is not None else f"not within {RECOVERY_S:g}s"
        self.idle_deleted = True
        self.idle_gate.set()
        self._note(
            "consumer-cancel:model",
            f"queue {name} deleted (had {counts}) and declared again by {by}; consumed by every "
            f"worker again {figure}",
        )

    # -- the end --------------------------------------------------------------------------

    async def _check_recovery(self) -> None:
        """Components that do not serve again within RECOVERY_S of the last fault."""
        failures, _, _ = await self._recovery()
        self.ledger.never_recovered = failures

    async def _verify(self, fault: str) -> None:
        """Right after ``fault``: every component serves again within RECOVERY_S."""
        failures, took, last = await self._recovery()
        for component, why in sorted(failures.items()):
            self.ledger.fault_checks.append(
                f"after {fault}: {component} not serving within {RECOVERY_S:g}s: {why}"
            )
        if not failures:
            self.ledger.faults[-1] += f"; every component serving again {took:.1f}s later"
            if last:
                waited_for = "; ".join(f"{k}: {v}" for k, v in sorted(last.items()))
                self.ledger.faults[-1] += f" (last to recover: {waited_for})"

    async def _recovery(self) -> tuple[dict[str, str], float, dict[str, str]]:
        """What still fails after RECOVERY_S (empty when all serve), how long it took, and what
        failed last before everything served."""
        answered: set[int] = set()
        failures: dict[str, list[str]] = {}
        last: dict[str, list[str]] = {}
        start = time.monotonic()
        deadline = start + RECOVERY_S
        while True:
            last = failures
            failures = defaultdict(list)
            await self._check_processes(failures)
            await self._check_broker_side(failures)
            await self._check_producers(failures, answered, deadline)
            if not failures or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
        took = time.monotonic() - start
        return (
            {k: "; ".join(v) for k, v in failures.items()},
            took,
            {k: "; ".join(v) for k, v in last.items()},
        )

    async def _check_processes(self, failures: dict[str, list[str]]) -> None:
        workers = await self.status.workers()
        if workers is None:
            failures["controller"].append("status API does not answer")
            return
        if not await self.status.healthy():
            failures["controller"].append("/healthz not ok")
        listed = {str(w.get("worker_id")): w for w in workers}
        for worker_id, proc in sorted(self.fleet.workers.items()):
            if proc.poll() is not None:
                failures[f"worker {worker_id}"].append(f"process exited {proc.returncode}")
                continue
            info = listed.get(worker_id)
            if info is None:
                failures[f"worker {worker_id}"].append("not in /v1/workers")
            elif info.get("pid") != proc.pid:
                failures[f"worker {worker_id}"].append(f"listed with old pid {info.get('pid')}")
            elif info.get("state") != "ready":
                failures[f"worker {worker_id}"].append(f"state {info.get('state')}")
            elif float(info.get("last_heartbeat_age_s", 0)) > HEARTBEAT_TIMEOUT_S:
                failures[f"worker {worker_id}"].append(
                    f"last heartbeat {info.get('last_heartbeat_age_s')}s ago"
                )
        if self.fleet.controller is None or self.fleet.controller.poll() is not None:
            failures["controller"].append("process exited")

    async def _check_broker_side(self, failures: dict[str, list[str]]) -> None:
        """Every queue a component needs is consumed by that very process, and bound."""
        consumers, channels, connections, bindings = await asyncio.gather(
            asyncio.to_thread(self.node.rows, "list_consumers", "queue_name", "channel_pid"),
            asyncio.to_thread(self.node.rows, "list_channels", "pid", "connection"),
            asyncio.to_thread(self.node.rows, "list_connections", "pid", "client_properties"),
            asyncio.to_thread(
                self.node.rows, "list_bindings", "source_name", "destination_name", "routing_key"
            ),
        )
        os_pid: dict[str, int] = {}
        for row in connections:
            for prop in row.get("client_properties") or []:
                if isinstance(prop, list) and len(prop) == 3 and prop[0] == "connection_name":
                    match = re.search(r":(\d+)$", str(prop[2]))
                    if match:
                        os_pid[str(row["pid"])] = int(match.group(1))
        channel_pid = {str(r["channel_pid"]) for r in consumers}
        owner = {
            str(r["pid"]): os_pid.get(str(r["connection"]))
            for r in channels
            if str(r["pid"]) in channel_pid
        }
        consumed_by: dict[int, set[str]] = defaultdict(set)
        for row in consumers:
            pid = owner.get(str(row["channel_pid"]))
            if pid is not None:
                consumed_by[pid].add(str(row["queue_name"]))
        bound = {(str(b["source_name"]), str(b["destination_name"])) for b in bindings}
        ns = self.names.ns

        def needs(component: str, pid: int, what: str, prefix: str, source: str) -> None:
            queues = [q for q in consumed_by[pid] if q == prefix or q.startswith(prefix + ".")]
            if not queues:
                failures[component].append(f"consumes no {what}")
            elif not any((source, q) in bound for q in queues):
                failures[component].append(f"its {what} is not bound to {source}")

        for worker_id, proc in sorted(self.fleet.workers.items()):
            for model in SERVED:
                queue = self.names.model_queue(model)
                if queue not in consumed_by[proc.pid]:
                    failures[f"worker {worker_id}"].append(f"does not consume {queue}")
            needs(
                f"worker {worker_id}", proc.pid, "control queue", f"{ns}.control", f"{ns}.control"
            )
        controller = self.fleet.controller
        if controller is not None:
            pid = controller.pid
            needs("controller", pid, "heartbeat queue", f"{ns}.controller", self.names.heartbeats)
            needs("controller", pid, "dead-letter tap", f"{ns}.dead.tap", self.names.dead)
            if self.names.unroutable not in consumed_by[pid]:
                failures["controller"].append(f"does not consume {self.names.unroutable}")
        for model in SERVED:
            if (self.names.jobs, self.names.model_queue(model)) not in bound:
                failures["controller"].append(f"model {model} not bound to {self.names.jobs}")
        if (self.names.dead, self.names.errors) not in bound:
            failures["topology"].append(f"{self.names.errors} not bound to {self.names.dead}")

    async def _check_producers(
        self, failures: dict[str, list[str]], answered: set[int], deadline: float
    ) -> None:
        async def fresh(index: int, client: Client) -> None:
            if index in answered:
                return
            key = f"fresh-{index}"
            try:
                left = max(1.0, deadline - time.monotonic())
                result = await client.submit(MODELS[index % 2], {"k": key, "work": 0}, timeout=left)
                if result == {"k": key}:
                    answered.add(index)
                    return
                failures[f"producer {index}"].append(f"fresh job answered {result!r}")
            except Exception as exc:
                failures[f"producer {index}"].append(f"fresh job failed: {exc}"[:300])

        await asyncio.gather(*(fresh(i, c) for i, c in enumerate(self.clients)))

    async def _read_errors(self) -> dict[str, list[str]]:
        """Keys found in the error queue, with their reasons (consumes: the run's namespace is
        deleted afterwards anyway)."""
        found: dict[str, list[str]] = defaultdict(list)

        async def read(channel: Any) -> None:
            queue = await channel.declare_queue(self.names.errors, passive=True)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    key = json.loads(message.body)["payload"]["k"]
                    found[key].append(dead_reason(message.headers))

        await on_channel(self.url, read)
        return found

    def _account(self, errors: dict[str, list[str]]) -> None:
        runs = executed_runs(self.logs)
        ledger = self.ledger
        killed = self.fleet.killed

        def died_every_time(key: str) -> bool:
            """Every run of ``key`` died with its worker, and its life saw at least
            delivery_limit moments that hand deliveries back (a SIGKILL, a broker restart): a
            worker that dies holding a job it had not started yet spends one of its deliveries
            too (README, failure behaviour), and the soak's execution logs see only runs."""
            pids = runs.get(key, [])
            if not all(pid in killed for pid in pids):
                return False
            began, ended = SPANS.get(key, (0.0, float("inf")))
            return deaths_between(self.fleet.deaths, began, ended) >= self.delivery_limit

        for job in [*self.jobs, *self.idle_jobs]:
            key = job.key
            outcome, waited = self.outcomes.get(key, ("MISSING", 0.0))
            ran = len(runs.get(key, []))
            reasons = errors.get(key, [])
            if waited > TIMEOUT_S + OVERDUE_SLACK_S:
                ledger.overdue.append((key, round(waited, 2)))
            if outcome == "ok":
                ledger.answered += 1
            elif outcome == "wrong":
                ledger.wrong_answers.append(key)
            elif outcome == "SPLICED":
                ledger.spliced.append(key)
            else:
                ledger.failed[outcome] += 1
                if ran:
                    ledger.failed_ran[outcome] += 1
                if outcome.startswith("WITHDRAWN"):
                    ledger.not_sent += 1
                    ledger.not_sent_ran += ran > 0
                elif ran == 0 and not reasons and outcome != "MISSING":
                    ledger.lost.append(f"{key} {outcome}: {self.messages.get(key, '')}")
            for reason in reasons:
                ledger.in_errors[reason] += 1
            if outcome == "WORKER_ERROR" and not died_every_time(key):
                ledger.false_failures.append(
                    f"{key}: producer told WORKER_ERROR after {ran} run(s)"
                )
            elif "worker_error" in reasons:
                ledger.false_failures.append(f"{key}: worker_error copy in the error queue")
            elif "delivery_limit" in reasons and not died_every_time(key):
                ledger.false_failures.append(f"{key}: dead-lettered delivery_limit, {ran} run(s)")
            if ran == 1:
                ledger.executed_once += 1
            elif ran > 1:
                ledger.duplicates += 1
        for key, reasons in errors.items():
            if not key.startswith(("j", "s", "i")) and "worker_error" in reasons:
                ledger.false_failures.append(f"{key}: worker_error copy in the error queue")


# When each job was submitted and ended (monotonic), for telling a delivery_limit dead letter
# the faults explain from a false failure.
SPANS: dict[str, tuple[float, float]] = {}


def deaths_between(deaths: Iterable[float], began: float, ended: float) -> int:
    """Distinct moments in [began, ended] that handed deliveries back: kills within half a
    second of each other (three workers killed at once) are one moment, since one job is held
    by one worker at a time."""
    moments = 0
    last = float("-inf")
    for when in sorted(deaths):
        if began <= when <= ended and when - last > 0.5:
            moments += 1
            last = when
    return moments


def executed_runs(logs: Path) -> dict[str, list[int]]:
    """The pids that ran each key, once per execution, from every worker's execution log."""
    runs: dict[str, list[int]] = defaultdict(list)
    for path in logs.glob("executed-*.log"):
        pid = int(path.stem.rsplit("-", 1)[1])
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and " " not in line:
                runs[line].append(pid)
    return runs


async def run_soak(
    url: str,
    *,
    jobs: int,
    producers: int = 3,
    lanes: int = 8,
    duration_s: float = 40.0,
    rounds: int = 1,
    broker_restart: bool = True,
    node: str | None = None,
) -> Ledger:
    """Run the soak against the broker at ``url``, whose node rabbitmqctl reaches as ``node``
    (default ``$CHAOS_NODE``, else rabbitmqctl's default node)."""
    soak = Soak(
        url,
        jobs=jobs,
        producers=producers,
        lanes=lanes,
        duration_s=duration_s,
        rounds=rounds,
        broker_restart=broker_restart,
        node=node if node is not None else os.environ.get("CHAOS_NODE"),
    )
    log.info("chaos soak: namespace %s, logs in %s", soak.namespace, soak.logs)
    return await soak.run()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=None, help="default 5000 (400 with --quick)")
    parser.add_argument("--quick", action="store_true", help="the CI form: the schedule once")
    parser.add_argument("--duration", type=float, default=None, help="seconds (default by size)")
    parser.add_argument("--no-broker-restart", action="store_true")
    parser.add_argument(
        "--url",
        default=os.environ.get("MODELFLEET_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    )
    parser.add_argument(
        "--node",
        default=os.environ.get("CHAOS_NODE"),
        help="rabbitmqctl -n for the broker at --url (default $CHAOS_NODE)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    jobs = args.jobs or (400 if args.quick else 5000)
    rounds = 1 if args.quick else max(1, round(jobs / 2500))
    duration = args.duration or (30.0 if args.quick else max(30.0, jobs / 50))
    ledger = asyncio.run(
        run_soak(
            args.url,
            jobs=jobs,
            duration_s=duration,
            rounds=rounds,
            broker_restart=not args.no_broker_restart,
            node=args.node or "",
        )
    )
    print(ledger.render())
    print("chaos soak", "PASSED" if ledger.passed else "FAILED")
    return 0 if ledger.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
