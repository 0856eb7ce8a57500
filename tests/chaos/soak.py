"""The chaos soak: jobs from several producers while workers, the controller and the broker fail.

Jepsen-style: inject faults, then account for every job. Each job carries a key; the handler
records every execution of a key (tests/chaos/handlers.py); the producer records its outcome and
how long it waited; at the end the error queue is read. A job is *lost* when its producer was not
answered and the job neither ran nor reached the error queue. A producer is *overdue* when it
waited past its own timeout.

    python -m tests.chaos.soak --jobs 5000          # `make chaos`
    python -m tests.chaos.soak --jobs 300 --quick   # what the test runs

Faults, spread over the run: workers SIGKILLed and restarted at random, one worker SIGSTOPped
and resumed, the controller restarted twice, the broker restarted once (rabbitmqctl stop_app /
start_app — this disturbs every client of the broker, so run it on a broker of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika

from modelfleet import Client, JobError
from modelfleet.config import settings_from_mapping
from modelfleet.topology import Names, Topology

MODELS = ("chaos-a", "chaos-b")
TIMEOUT_S = 15.0
# Each job takes this long on a worker, so killed workers really die holding jobs.
WORK_S = 0.2
# A producer may notice its deadline a little late (event loop busy, GC): this much is not overdue.
OVERDUE_SLACK_S = 1.0


@dataclass
class Ledger:
    submitted: int = 0
    answered: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    not_sent: int = 0
    in_errors: Counter[str] = field(default_factory=Counter)
    executed_once: int = 0
    duplicates: int = 0
    lost: list[str] = field(default_factory=list)
    overdue: list[tuple[str, float]] = field(default_factory=list)
    wrong_answers: int = 0
    faults: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def render(self) -> str:
        lines = [
            "chaos soak ledger",
            f"  jobs submitted          {self.submitted}",
            f"  answered                {self.answered}",
            f"  failed with a code      {sum(self.failed.values())}  {dict(self.failed)}",
            f"    of which never sent   {self.not_sent}  (publish refused during the outage; "
            "producer told)",
            f"  in the error queue      {sum(self.in_errors.values())}  {dict(self.in_errors)}",
            f"  executed once           {self.executed_once}",
            f"  executed more than once {self.duplicates}  (at-least-once redeliveries)",
            f"  wrong answers           {self.wrong_answers}",
            f"  LOST                    {len(self.lost)}  {self.lost[:10]}",
            f"  producers overdue       {len(self.overdue)}  {self.overdue[:5]}",
            f"  faults injected         {len(self.faults)}: " + ", ".join(self.faults),
            f"  wall time               {self.seconds:.1f}s",
        ]
        return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([ctl, *args], check=True, capture_output=True, timeout=120)


class Processes:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.workers: list[subprocess.Popen[bytes]] = []
        self.controller: subprocess.Popen[bytes] | None = None
        self._count = 0

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        self._count += 1
        with (self.logs / f"{name}-{self._count}.log").open("wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "modelfleet", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def start_worker(self) -> subprocess.Popen[bytes]:
        args = ["worker", "--handler", "tests.chaos.handlers:record", "--concurrency", "8"]
        for model in MODELS:
            args += ["--model", model]
        return self.spawn("worker", *args)

    def start_controller(self) -> None:
        self.controller = self.spawn("controller", "controller")

    def all(self) -> list[subprocess.Popen[bytes]]:
        return [*self.workers, *([self.controller] if self.controller else [])]

    def stop_all(self) -> None:
        for proc in self.all():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                    proc.send_signal(signal.SIGTERM)
        for proc in self.all():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _faults(procs: Processes, ledger: Ledger, duration_s: float, broker: bool) -> None:
    """Spread the fault schedule over ``duration_s``."""
    rng = random.Random(7)
    start = time.monotonic()

    def at(share: float) -> float:
        return start + duration_s * share

    schedule: list[tuple[float, str]] = [
        (at(0.10), "kill"),
        (at(0.20), "stop"),
        (at(0.30), "controller"),
        (at(0.40), "kill"),
        (at(0.50), "broker" if broker else "kill"),
        (at(0.65), "kill"),
        (at(0.75), "controller"),
        (at(0.85), "kill"),
    ]
    for when, fault in schedule:
        await asyncio.sleep(max(0.0, when - time.monotonic()))
        if fault == "kill":
            index = rng.randrange(len(procs.workers))
            victim = procs.workers[index]
            victim.send_signal(signal.SIGKILL)
            await asyncio.to_thread(victim.wait)
            await asyncio.sleep(0.5)
            procs.workers[index] = procs.start_worker()
            ledger.faults.append(f"SIGKILL worker {victim.pid}")
        elif fault == "stop":
            victim = procs.workers[rng.randrange(len(procs.workers))]
            victim.send_signal(signal.SIGSTOP)
            await asyncio.sleep(3.0)
            victim.send_signal(signal.SIGCONT)
            ledger.faults.append(f"SIGSTOP 3s worker {victim.pid}")
        elif fault == "controller":
            assert procs.controller is not None
            procs.controller.send_signal(signal.SIGTERM)
            await asyncio.to_thread(procs.controller.wait, 20)
            procs.start_controller()
            ledger.faults.append("controller restart")
        elif fault == "broker":
            await asyncio.to_thread(_rabbitmqctl, "stop_app")
            await asyncio.sleep(2.0)
            await asyncio.to_thread(_rabbitmqctl, "start_app")
            ledger.faults.append("broker restart (stop_app/start_app)")


async def _produce(
    settings: Any,
    keys: list[str],
    outcomes: dict[str, tuple[str, float]],
    ledger: Ledger,
    concurrency: int,
    pace_s: float,
) -> None:
    async with Client(settings) as client:
        queue: asyncio.Queue[str] = asyncio.Queue()
        for key in keys:
            queue.put_nowait(key)

        async def one_lane() -> None:
            while True:
                try:
                    key = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                model = MODELS[hash(key) % len(MODELS)]
                started = time.monotonic()
                try:
                    payload = {"k": key, "work": WORK_S}
                    result = await client.submit(model, payload, timeout=TIMEOUT_S)
                    outcome = "ok" if result == {"k": key} else "wrong"
                except JobError as exc:
                    outcome = exc.code.name
                    if "was not sent" in exc.message:
                        outcome = "NOT_SENT"
                except Exception as exc:  # anything else is a bug the ledger must show
                    outcome = f"EXC:{type(exc).__name__}"
                outcomes[key] = (outcome, time.monotonic() - started)
                await asyncio.sleep(pace_s)

        await asyncio.gather(*(one_lane() for _ in range(concurrency)))


async def _read_errors(url: str, names: Names) -> dict[str, str]:
    """Keys found in the error queue, with their reason (consumes: the run's namespace is
    deleted afterwards anyway)."""
    from modelfleet.topology import dead_reason

    found: dict[str, str] = {}
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(names.errors, passive=True)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                key = json.loads(message.body)["payload"]["k"]
                found[key] = dead_reason(message.headers)
    finally:
        await connection.close()
    return found


async def run_soak(
    url: str,
    *,
    jobs: int,
    producers: int = 3,
    lanes: int = 8,
    duration_s: float = 40.0,
    broker_restart: bool = True,
) -> Ledger:
    namespace = f"chaos-{uuid.uuid4().hex[:8]}"
    names = Names(namespace)
    logs = Path(tempfile.mkdtemp(prefix="modelfleet-chaos-"))
    env = {
        **os.environ,
        "CHAOS_LOG_DIR": str(logs),
        "MODELFLEET_NAMESPACE": namespace,
        "MODELFLEET_AMQP__URL": url,
        "MODELFLEET_HTTP__PORT": str(_free_port()),
        "MODELFLEET_HEARTBEAT__INTERVAL": "0.5",
        "MODELFLEET_HEARTBEAT__TIMEOUT": "2",
        "MODELFLEET_ROUTING__NO_WORKER_GRACE_S": "2",
        "MODELFLEET_WORKER__STOP_GRACE_S": "5",
        "PYTHONPATH": os.getcwd(),
    }
    settings = settings_from_mapping(
        {"namespace": namespace, "amqp": {"url": url}, "client": {"timeout_s": TIMEOUT_S}}
    )
    ledger = Ledger(submitted=jobs)
    procs = Processes(env, logs)
    outcomes: dict[str, tuple[str, float]] = {}
    keys = [f"j{i:06d}" for i in range(jobs)]
    started = time.monotonic()
    try:
        procs.start_controller()
        procs.workers = [procs.start_worker() for _ in range(4)]
        await _wait_ready(settings, env)
        share = [keys[i::producers] for i in range(producers)]
        # Pace the producers so the run lasts about `duration_s` and faults land mid-flow.
        pace = max(0.0, duration_s * lanes * producers / max(jobs, 1) - WORK_S)
        work = [_produce(settings, part, outcomes, ledger, lanes, pace) for part in share]
        await asyncio.gather(_faults(procs, ledger, duration_s, broker_restart), *work)
        # Let expired jobs reach the error queue (TTL dead-lettering happens at the queue head).
        await asyncio.sleep(3)
    finally:
        procs.stop_all()
    ledger.seconds = time.monotonic() - started

    executed = await asyncio.to_thread(_executed, logs)
    errors = await _read_errors(url, names)
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(url)
        channel = await connection.channel()
        await Topology(names).delete(channel, list(MODELS))
        await connection.close()

    for key in keys:
        outcome, waited = outcomes.get(key, ("MISSING", 0.0))
        if waited > TIMEOUT_S + OVERDUE_SLACK_S:
            ledger.overdue.append((key, round(waited, 2)))
        if outcome == "ok":
            ledger.answered += 1
        elif outcome == "wrong":
            ledger.wrong_answers += 1
        else:
            ledger.failed[outcome] += 1
            if outcome == "NOT_SENT":
                ledger.not_sent += 1
            elif executed[key] == 0 and key not in errors:
                ledger.lost.append(key)
        if key in errors:
            ledger.in_errors[errors[key]] += 1
        if executed[key] == 1:
            ledger.executed_once += 1
        elif executed[key] > 1:
            ledger.duplicates += 1
    return ledger


def _executed(logs: Path) -> Counter[str]:
    """How many times each key ran, from every worker's execution log."""
    executed: Counter[str] = Counter()
    for path in logs.glob("executed-*.log"):
        executed.update(line.strip() for line in path.read_text().splitlines() if line.strip())
    return executed


async def _wait_ready(settings: Any, env: dict[str, str]) -> None:
    """Until both models answer (the fleet is up and routable)."""
    deadline = time.monotonic() + 60
    async with Client(settings) as client:
        for model in MODELS:
            while True:
                try:
                    await client.submit(model, {"k": "warmup", "work": 0}, timeout=2)
                    break
                except JobError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--duration", type=float, default=None, help="seconds (default by size)")
    parser.add_argument("--no-broker-restart", action="store_true")
    parser.add_argument(
        "--url",
        default=os.environ.get("MODELFLEET_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    )
    args = parser.parse_args()
    duration = args.duration or max(30.0, args.jobs / 50)
    ledger = asyncio.run(
        run_soak(
            args.url, jobs=args.jobs, duration_s=duration, broker_restart=not args.no_broker_restart
        )
    )
    print(ledger.render())
    ok = not ledger.lost and not ledger.overdue and not ledger.wrong_answers
    ok = ok and not any(k.startswith(("EXC", "MISSING")) for k in ledger.failed)
    print("chaos soak", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
