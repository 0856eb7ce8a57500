"""modelfleet's benchmark: every scenario side by side with its floor, on one broker, in one run.

    .venv/bin/python -m bench.run                 # full: 5 rounds each (make bench)
    .venv/bin/python -m bench.run --quick         # 1 round, small sizes (CI smoke test)
    .venv/bin/python -m bench.run --only e2e,scale --rounds 3 --json /tmp/bench.json

Scenarios (bench/README.md explains each; every one runs in its own namespace ``bench-<hex>``,
deleted after, and every process it starts is stopped by PID, even on error):

* ``e2e``        jobs/s at 64 and 256 in flight, latency at 1 in flight: a real controller,
                 2 real workers (echo) and a Client, vs a naive aio-pika RPC (bench/naive.py)
* ``ceiling``    messages/s one connection pushes into a queue with pre-encoded frames
* ``streaming``  chunks/s and time to first chunk of a 200-chunk stream, vs the naive RPC
* ``heartbeats`` heartbeats/s the controller absorbs (registry kept current) vs a raw consumer
* ``scale``      10,000 simulated workers over 1,000 models: RSS, sweep, ``/v1/models``
* ``failover``   SIGKILL of a worker holding jobs until another answers them
* ``eviction``   SIGSTOP of a worker until the controller evicts it

Medians of the rounds are printed with their ratio to the floor measured in the same run, and
each target of issue 5 with PASS or MISS. Missing a target does not fail the run; a scenario
that cannot run does (exit 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: `python bench/run.py`
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402
from collections.abc import AsyncIterator, Awaitable, Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import aio_pika  # noqa: E402
import aiohttp  # noqa: E402

from bench.amqp_raw import RawPublisher, batches, encode_publish  # noqa: E402
from bench.handlers import STREAM_CHUNKS  # noqa: E402
from bench.naive import NaiveClient, declare_queue  # noqa: E402
from bench.sim import SimulatedFleet  # noqa: E402
from modelfleet import __version__  # noqa: E402
from modelfleet.client import Client  # noqa: E402
from modelfleet.config import Settings, settings_from_mapping  # noqa: E402
from modelfleet.controller import Controller  # noqa: E402
from modelfleet.topology import Names, Topology  # noqa: E402

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
# 256 bytes of JSON: {"text": "xxx…"}
PAYLOAD = {"text": "x" * (256 - len(json.dumps({"text": ""})))}
SCENARIOS = ("e2e", "ceiling", "streaming", "heartbeats", "scale", "failover", "eviction")
DEFAULTS = Settings()


# -- sizes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How big each scenario is (``--quick`` shrinks everything)."""

    rounds: int
    quick: bool
    concurrency: int  # per worker, modelfleet and naive alike
    throughput_s: float  # one throughput measurement
    latency_calls: int  # sequential jobs per latency round
    ceiling_messages: int
    client_messages: int  # aio-pika publish loop
    streams: int  # streams per round per system
    hb_workers: int
    hb_models: int
    hb_beats: int  # heartbeats per simulated worker per round (first one introduces it)
    scale_workers: int
    scale_models: int
    scale_sweeps: int
    scale_requests: int
    failover_rounds: int
    eviction_rounds: int

    @classmethod
    def build(cls, quick: bool, rounds: int | None, concurrency: int) -> Plan:
        if quick:
            return cls(
                rounds=rounds or 1,
                quick=True,
                concurrency=concurrency,
                throughput_s=1.0,
                latency_calls=50,
                ceiling_messages=10_000,
                client_messages=2_000,
                streams=2,
                hb_workers=500,
                hb_models=5,
                hb_beats=4,
                scale_workers=1_000,
                scale_models=100,
                scale_sweeps=50,
                scale_requests=10,
                failover_rounds=rounds or 1,
                eviction_rounds=rounds or 1,
            )
        rounds = rounds or 5
        return cls(
            rounds=rounds,
            quick=False,
            concurrency=concurrency,
            throughput_s=3.0,
            latency_calls=400,
            ceiling_messages=60_000,
            client_messages=20_000,
            streams=10,
            hb_workers=2_000,
            hb_models=10,
            hb_beats=11,
            scale_workers=10_000,
            scale_models=1_000,
            scale_sweeps=500,
            scale_requests=100,
            failover_rounds=rounds,
            eviction_rounds=max(3, rounds - 2),
        )


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """``kind``: "ratio>=", "ratio<=" (against the floor) or "value<=" (absolute)."""

    kind: str
    bound: float
    text: str

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        if self.kind == "value<=":
            return None if value is None else value <= self.bound
        if ratio is None:
            return None
        return ratio >= self.bound if self.kind == "ratio>=" else ratio <= self.bound


@dataclass
class Row:
    scenario: str
    metric: str
    unit: str  # "rate", "ms", "s", "MB", "%"
    values: list[float] = field(default_factory=list)  # modelfleet, one per round
    floor: list[float] = field(default_factory=list)  # its floor, one per round
    floor_name: str = ""
    target: Target | None = None
    note: str = ""
    error: str = ""

    @property
    def value(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def floor_value(self) -> float | None:
        return statistics.median(self.floor) if self.floor else None

    @property
    def ratio(self) -> float | None:
        """The median of the rounds' own ratios when each round measured both sides back to back
        (load that comes and goes cancels out); else the ratio of the medians."""
        if self.values and len(self.values) == len(self.floor) and all(self.floor):
            return statistics.median(v / f for v, f in zip(self.values, self.floor, strict=True))
        value, floor = self.value, self.floor_value
        if value is None or not floor:
            return None
        return value / floor

    @property
    def result(self) -> str:
        if self.error:
            return "ERROR"
        if self.target is None:
            return ""
        met = self.target.met(self.value, self.ratio)
        return "-" if met is None else ("PASS" if met else "MISS")

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "metric": self.metric,
            "unit": self.unit,
            "modelfleet": self.value,
            "floor": self.floor_value,
            "floor_name": self.floor_name,
            "ratio": self.ratio,
            "target": self.target.text if self.target else None,
            "result": self.result,
            "note": self.note,
            "error": self.error,
            "rounds": {"modelfleet": self.values, "floor": self.floor},
        }


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "rate":
        return f"{value:,.0f}"
    if unit in ("ms", "s"):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return f"{value:.1f}"


def render_table(rows: list[Row]) -> str:
    headers = ["SCENARIO", "METRIC", "MODELFLEET", "FLOOR", "FLOOR IS", "RATIO", "TARGET", "RESULT"]
    lines = [
        [
            r.scenario,
            r.metric,
            fmt(r.value, r.unit),
            fmt(r.floor_value, r.unit),
            r.floor_name or "-",
            "-" if r.ratio is None else f"{r.ratio:.3f}x",
            r.target.text if r.target else "-",
            r.result or "-",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    numeric = {2, 3, 5}

    def render(cells: list[str]) -> str:
        parts = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [render(headers), render(["-" * w for w in widths])]
    out += [render(line) for line in lines]
    notes = [f"  {r.scenario} / {r.metric}: {r.note}" for r in rows if r.note]
    errors = [f"  {r.scenario} / {r.metric}: {r.error}" for r in rows if r.error]
    if notes:
        out += ["", "notes:", *notes]
    if errors:
        out += ["", "errors:", *errors]
    return "\n".join(out)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def say(text: str) -> None:
    print(text, flush=True)


# -- processes and namespaces --------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pid() -> int | None:
    """The local RabbitMQ's Erlang VM, when the broker runs on this machine."""
    found = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True).stdout
    return int(found.split()[0]) if found.split() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Every subprocess the benchmark starts; each is stopped by its PID."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
        log = self.logs / f"{name}-{len(self.procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc.log_path = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(procs: list[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
        """SIGCONT + SIGTERM each live one, SIGKILL what is left after ``grace_s``, reap all."""
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        self.stop(self.procs)


class Namespace:
    """A random namespace ``bench-<hex>``; remembers what to delete after."""

    def __init__(self, url: str) -> None:
        self.name = f"bench-{uuid.uuid4().hex[:10]}"
        self.url = url
        self.names = Names(self.name)
        self.models: set[str] = set()
        self.queues: set[str] = set()

    def model(self, prefix: str = "m") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.models.add(name)
        return name

    def queue(self, suffix: str) -> str:
        name = f"{self.name}.bench.{suffix}"
        self.queues.add(name)
        return name

    def settings(self, **overrides: Any) -> Settings:
        data: dict[str, Any] = {"namespace": self.name, "amqp": {"url": self.url}}
        for key, value in overrides.items():
            if isinstance(value, dict):
                data.setdefault(key, {}).update(value)
            else:
                data[key] = value
        return settings_from_mapping(data)

    def env(self, port: int, **extra: str) -> dict[str, str]:
        return {
            "MODELFLEET_NAMESPACE": self.name,
            "MODELFLEET_AMQP__URL": self.url,
            "MODELFLEET_HTTP__PORT": str(port),
            **extra,
        }

    async def cleanup(self) -> None:
        connection = await aio_pika.connect(self.url)
        try:
            channel = await connection.channel()
            await Topology(self.names).delete(channel, sorted(self.models))
            for queue in sorted(self.queues):
                await channel.queue_delete(queue)
        finally:
            await connection.close()


class Status:
    """The controller's status API over HTTP."""

    def __init__(self, port: int, watch: list[subprocess.Popen[bytes]]) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.watch = watch
        self._session: aiohttp.ClientSession | None = None

    async def get(self, path: str) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        async with self._session.get(self.base + path) as response:
            return await response.json()

    async def wait(
        self, path: str, check: Callable[[Any], Any], *, timeout: float, what: str, poll: float
    ) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            for proc in self.watch:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"process {proc.pid} exited ({proc.returncode}) while waiting for "
                        f"{what}; see {getattr(proc, 'log_path', '?')}"
                    )
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                last = await self.get(path)
                if check(last):
                    return last
            await asyncio.sleep(poll)
        raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}; last {last}")

    async def wait_routable(self, model: str, workers: int, timeout: float = 30) -> None:
        await self.wait(
            "/v1/models",
            lambda d: any(
                m["name"] == model and m["workers"] == workers and m["routable"]
                for m in d["models"]
            ),
            timeout=timeout,
            what=f"{model} routable with {workers} worker(s)",
            poll=0.05,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@dataclass
class Context:
    url: str
    plan: Plan
    procs: Processes
    settings_used: dict[str, dict[str, Any]] = field(default_factory=dict)


class Scenario:
    """One scenario's namespace and processes: both gone when it ends, however it ends."""

    def __init__(self, ctx: Context, key: str) -> None:
        self.ctx = ctx
        self.key = key
        self.ns = Namespace(ctx.url)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.status: Status | None = None

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = self.ctx.procs.spawn(f"{self.key}-{name}", args, env)
        self.procs.append(proc)
        return proc

    async def controller(self, **env_extra: str) -> tuple[Status, dict[str, str]]:
        port = free_port()
        env = self.ns.env(port, **env_extra)
        proc = self.spawn("controller", ["-m", "modelfleet", "controller"], env)
        self.status = Status(port, [proc])
        await self.status.wait(
            "/v1/models", lambda d: "models" in d, timeout=30, what="the controller", poll=0.05
        )
        shown = {k: v for k, v in env.items() if k not in ("MODELFLEET_AMQP__URL",)}
        self.ctx.settings_used[self.key] = shown
        return self.status, env

    def worker(
        self, env: dict[str, str], model: str, handler: str, concurrency: int
    ) -> subprocess.Popen[bytes]:
        args = ["-m", "modelfleet", "worker", "--model", model, "--handler", handler]
        args += ["--concurrency", str(concurrency)]
        return self.spawn("worker", args, env)

    async def naive_workers(
        self, queue: str, prefetch: int, chunks: int = 0, count: int = 2
    ) -> list[subprocess.Popen[bytes]]:
        """``count`` naive workers on ``queue``, declared here first: two workers declaring a
        new quorum queue at once can catch it before its leader is elected, and RabbitMQ 3.10
        then closes the connection with INTERNAL_ERROR."""
        connection = await aio_pika.connect(self.ctx.url)
        try:
            await declare_queue(await connection.channel(), queue)
        finally:
            await connection.close()
        args = ["-m", "bench.naive", "--url", self.ctx.url, "--queue", queue]
        args += ["--prefetch", str(prefetch), "--chunks", str(chunks)]
        return [self.spawn("naive", args, {}) for _ in range(count)]

    async def close(self) -> None:
        if self.status is not None:
            await self.status.close()
        Processes.stop(self.procs)
        try:
            await self.ns.cleanup()
        except Exception as exc:
            say(f"  (clean-up of {self.ns.name} failed: {exc})")


@contextlib.asynccontextmanager
async def scenario(ctx: Context, key: str) -> AsyncIterator[Scenario]:
    sc = Scenario(ctx, key)
    say(f"\n== {key} (namespace {sc.ns.name})")
    try:
        yield sc
    finally:
        await sc.close()


async def wait_consumers(url: str, queue: str, count: int, procs: list[Any]) -> None:
    connection = await aio_pika.connect(url)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"naive worker {proc.pid} exited; see {proc.log_path}")
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                declared = await channel.declare_queue(queue, passive=True)
                if (declared.declaration_result.consumer_count or 0) >= count:
                    await channel.close()
                    return
            with contextlib.suppress(Exception):
                await channel.close()
            await asyncio.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {count} consumers on {queue}")
    finally:
        await connection.close()


# -- load shapes ---------------------------------------------------------------------------

Call = Callable[[], Awaitable[Any]]


async def closed_loop(call: Call, in_flight: int, duration_s: float) -> float:
    """``in_flight`` loops each calling ``call`` back to back for ``duration_s``: jobs/s."""
    loop = asyncio.get_running_loop()
    done = 0
    deadline = loop.time() + duration_s

    async def runner() -> None:
        nonlocal done
        while loop.time() < deadline:
            await call()
            done += 1

    started = loop.time()
    await asyncio.gather(*(runner() for _ in range(in_flight)))
    return done / (loop.time() - started)


async def abba(order: list[str], measure: Callable[[str], Awaitable[Any]]) -> dict[str, list[Any]]:
    """Measure two systems A B B A, so a load that rises or falls during the round weighs on
    both alike; each system's two results, in a list."""
    first, second = order
    results: dict[str, list[Any]] = {first: [], second: []}
    for name in (first, second, second, first):
        results[name].append(await measure(name))
    return results


async def sequential(call: Call, count: int) -> list[float]:
    """Latencies of ``count`` calls, one at a time, in seconds."""
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


# -- scenarios -----------------------------------------------------------------------------


async def run_e2e(ctx: Context) -> list[Row]:
    plan = ctx.plan
    rows = {
        64: Row("e2e, 64 in flight", "jobs/s", "rate", floor_name="naive aio-pika RPC"),
        256: Row("e2e, 256 in flight", "jobs/s", "rate", floor_name="naive aio-pika RPC"),
    }
    rows[64].target = Target("ratio>=", 2.0, ">= 2x floor")
    latency = {
        q: Row("latency, 1 in flight", f"p{q} ms", "ms", floor_name="naive aio-pika RPC")
        for q in (50, 90, 99)
    }
    latency[50].target = Target("ratio<=", 1.1, "<= 1.1x floor")
    cpu_row = Row("e2e, 64 in flight", "CPU ms/job, Python", "ms", floor_name="naive aio-pika RPC")
    cpu_row.note = (
        "CPU time of client + workers (+ controller for modelfleet) per job, from /proc: "
        "unlike jobs/s it does not depend on how much of the machine other processes take"
    )
    split_rows = {
        part: Row("e2e, 64 in flight", f"CPU ms/job, {part}", "ms", floor_name="naive aio-pika RPC")
        for part in ("producer", "workers")
    }
    split_rows["producer"].note = "of which the producer (the bench process: Client or naive)"
    split_rows["workers"].note = "of which the 2 worker processes"
    busy_row = Row(
        "e2e, 64 in flight", "CPU busy % of all cores", "%", floor_name="naive aio-pika RPC"
    )
    busy_row.note = (
        "(Python + broker CPU ms/job) x jobs/s over the machine's cores: below 100 the run is "
        "bound by latency (prefetch credit, round trips), not CPU"
    )
    broker_row = Row(
        "e2e, 64 in flight", "CPU ms/job, broker", "ms", floor_name="naive aio-pika RPC"
    )
    beam = broker_pid()
    async with scenario(ctx, "e2e") as sc:
        status, env = await sc.controller()
        model = sc.ns.model("echo")
        naive_queue = sc.ns.queue("naive")
        workers = [
            sc.worker(env, model, "modelfleet.handlers:echo", plan.concurrency) for _ in range(2)
        ]
        naive = await sc.naive_workers(naive_queue, plan.concurrency)
        status.watch += workers
        # Producer first, then the workers (then modelfleet's controller).
        pids = {
            "modelfleet": [os.getpid(), *(w.pid for w in workers), sc.procs[0].pid],
            "floor": [os.getpid(), *(w.pid for w in naive)],
        }
        await status.wait_routable(model, 2)
        await wait_consumers(ctx.url, naive_queue, 2, naive)
        say(
            f"  2 modelfleet workers (echo, --concurrency {plan.concurrency}) + controller; "
            f"2 naive workers (prefetch {plan.concurrency}); payload {len(json.dumps(PAYLOAD))} B"
        )
        async with (
            Client(sc.ns.settings(), timeout=60) as client,
            NaiveClient(ctx.url, naive_queue) as floor,
        ):
            calls: dict[str, Call] = {
                "modelfleet": lambda: client.submit(model, PAYLOAD),
                "floor": lambda: floor.call(PAYLOAD),
            }
            for name, call in calls.items():  # warm-up, and a check that echo echoes
                if await call() != PAYLOAD:
                    raise RuntimeError(f"{name}: the echo did not return the payload")
                await closed_loop(call, 64, 0.5 if plan.quick else 1.0)
            for n in range(plan.rounds):
                order = list(calls) if n % 2 == 0 else list(reversed(calls))
                line = []
                for in_flight, row in rows.items():

                    async def timed(name: str, k: int = in_flight) -> tuple[float, ...]:
                        procs = pids[name]
                        before = [cpu_seconds(p) for p in procs]
                        beam_before = cpu_seconds(beam) if beam else 0.0
                        started = time.perf_counter()
                        rate = await closed_loop(calls[name], k, plan.throughput_s / 2)
                        jobs = rate * (time.perf_counter() - started)
                        ms = [
                            (cpu_seconds(p) - b) / jobs * 1000
                            for p, b in zip(procs, before, strict=True)
                        ]
                        beam_used = (cpu_seconds(beam) - beam_before) if beam else 0.0
                        beam_ms = beam_used / jobs * 1000
                        busy = (sum(ms) + beam_ms) * rate / 1000 / (os.cpu_count() or 1) * 100
                        return rate, sum(ms), beam_ms, ms[0], ms[1] + ms[2], busy

                    measured = await abba(order, timed)
                    for name, pairs in measured.items():
                        mine = name == "modelfleet"
                        (row.values if mine else row.floor).append(
                            statistics.fmean(p[0] for p in pairs)
                        )
                        if in_flight == 64:
                            (cpu_row.values if mine else cpu_row.floor).append(
                                statistics.fmean(p[1] for p in pairs)
                            )
                            if beam:
                                (broker_row.values if mine else broker_row.floor).append(
                                    statistics.fmean(p[2] for p in pairs)
                                )
                            (busy_row.values if mine else busy_row.floor).append(
                                statistics.fmean(p[5] for p in pairs)
                            )
                            for i, split in enumerate(split_rows.values(), start=3):
                                (split.values if mine else split.floor).append(
                                    statistics.fmean(p[i] for p in pairs)
                                )
                    line.append(f"{in_flight}: {row.values[-1]:,.0f} vs {row.floor[-1]:,.0f}")
                samples = await abba(
                    order, lambda name: sequential(calls[name], max(1, plan.latency_calls // 2))
                )
                for name, halves in samples.items():
                    joined = [x for half in halves for x in half]
                    for q, row in latency.items():
                        ms = percentile(joined, q / 100) * 1000
                        (row.values if name == "modelfleet" else row.floor).append(ms)
                line.append(f"p50 {latency[50].values[-1]:.2f} vs {latency[50].floor[-1]:.2f} ms")
                say(f"  round {n + 1}: jobs/s " + "; ".join(line))
    broker_row.note = (
        "CPU time of the local RabbitMQ (beam.smp) per job"
        if beam
        else "the broker is not a local process: not measured"
    )
    return [
        *rows.values(),
        cpu_row,
        *split_rows.values(),
        broker_row,
        busy_row,
        *latency.values(),
    ]


async def run_ceiling(ctx: Context) -> list[Row]:
    plan = ctx.plan
    n = plan.ceiling_messages
    quorum = Row("broker ceiling, quorum queue", "msgs/s", "rate", floor_name="raw frames")
    quorum.note = (
        f"{n:,} persistent 256 B messages per round on one connection, pre-encoded frames, "
        "publisher confirms (batched by the broker); model queues are quorum queues"
    )
    classic = Row("broker ceiling, classic queue", "msgs/s", "rate", floor_name="raw frames")
    classic.note = "the same into a transient classic queue, transient messages"
    client_loop = Row("aio-pika publish loop, quorum", "msgs/s", "rate", floor_name="aio-pika")
    client_loop.note = (
        f"{plan.client_messages:,} aio-pika publishes of a pre-built message, confirms awaited "
        "in windows of 1,000: the Python client's per-message cost"
    )
    async with scenario(ctx, "ceiling") as sc:
        connection = await aio_pika.connect(ctx.url)
        try:
            channel = await connection.channel()
            q_quorum = sc.ns.queue("ceiling-quorum")
            q_classic = sc.ns.queue("ceiling-classic")
            queues = {
                q_quorum: await channel.declare_queue(
                    q_quorum, durable=True, arguments={"x-queue-type": "quorum"}
                ),
                q_classic: await channel.declare_queue(q_classic, durable=False),
            }
            body = b"x" * 256
            frames = {
                q_quorum: encode_publish("", q_quorum, body, delivery_mode=2),
                q_classic: encode_publish("", q_classic, body, delivery_mode=1),
            }
            for r in range(plan.rounds):
                for name, row in ((q_quorum, quorum), (q_classic, classic)):
                    await queues[name].purge()
                    publisher = await RawPublisher.connect(ctx.url)
                    try:
                        buffers = [frames[name] * 2000] * (n // 2000) + [frames[name] * (n % 2000)]
                        started = time.perf_counter()
                        await publisher.publish_encoded(buffers, n)
                        row.floor.append(n / (time.perf_counter() - started))
                    finally:
                        await publisher.close()
                await queues[q_quorum].purge()
                confirm_channel = await connection.channel(publisher_confirms=True)
                message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                started = time.perf_counter()
                for start in range(0, plan.client_messages, 1000):
                    count = min(1000, plan.client_messages - start)
                    await asyncio.gather(
                        *(
                            confirm_channel.default_exchange.publish(message, routing_key=q_quorum)
                            for _ in range(count)
                        )
                    )
                client_loop.floor.append(plan.client_messages / (time.perf_counter() - started))
                await confirm_channel.close()
                say(
                    f"  round {r + 1}: quorum {quorum.floor[-1]:,.0f}/s, classic "
                    f"{classic.floor[-1]:,.0f}/s, aio-pika loop {client_loop.floor[-1]:,.0f}/s"
                )
            for queue in queues.values():
                await queue.purge()
        finally:
            await connection.close()
    return [quorum, classic, client_loop]


async def run_streaming(ctx: Context) -> list[Row]:
    plan = ctx.plan
    rate = Row("streaming, 200 chunks", "chunks/s", "rate", floor_name="naive aio-pika RPC")
    first = Row("streaming, 200 chunks", "first chunk ms", "ms", floor_name="naive aio-pika RPC")
    rate.note = (
        f"one stream at a time, {plan.streams} per round; chunks/s = 200 / (final reply - submit)"
    )
    async with scenario(ctx, "streaming") as sc:
        status, env = await sc.controller()
        model = sc.ns.model("stream")
        naive_queue = sc.ns.queue("naive-stream")
        workers = [
            sc.worker(env, model, "bench.handlers:stream200", plan.concurrency) for _ in range(2)
        ]
        naive = await sc.naive_workers(naive_queue, plan.concurrency, STREAM_CHUNKS)
        status.watch += workers
        await status.wait_routable(model, 2)
        await wait_consumers(ctx.url, naive_queue, 2, naive)
        async with (
            Client(sc.ns.settings(), timeout=60) as client,
            NaiveClient(ctx.url, naive_queue) as floor,
        ):

            async def modelfleet_stream() -> tuple[float, float]:
                started = time.perf_counter()
                first_at: float | None = None
                count = 0
                async with client.stream(model, {"n": STREAM_CHUNKS}) as stream:
                    async for _ in stream:
                        if first_at is None:
                            first_at = time.perf_counter()
                        count += 1
                if count != STREAM_CHUNKS or first_at is None:
                    raise RuntimeError(f"modelfleet stream gave {count} chunks")
                return first_at - started, STREAM_CHUNKS / (time.perf_counter() - started)

            async def floor_stream() -> tuple[float, float]:
                started = time.perf_counter()
                first_at: list[float] = []

                def on_chunk() -> None:
                    if not first_at:
                        first_at.append(time.perf_counter())

                count = await floor.stream({"n": STREAM_CHUNKS}, on_chunk)
                if count != STREAM_CHUNKS:
                    raise RuntimeError(f"naive stream gave {count} chunks")
                return first_at[0] - started, STREAM_CHUNKS / (time.perf_counter() - started)

            runs = {"modelfleet": modelfleet_stream, "floor": floor_stream}
            for run in runs.values():
                await run()  # warm-up
            for r in range(plan.rounds):
                order = list(runs) if r % 2 == 0 else list(reversed(runs))

                async def streams(name: str) -> list[tuple[float, float]]:
                    return [await runs[name]() for _ in range(max(1, plan.streams // 2))]

                measured = await abba(order, streams)
                for name, halves in measured.items():
                    samples = [x for half in halves for x in half]
                    ttfc = statistics.median(s[0] for s in samples) * 1000
                    cps = statistics.median(s[1] for s in samples)
                    (first.values if name == "modelfleet" else first.floor).append(ttfc)
                    (rate.values if name == "modelfleet" else rate.floor).append(cps)
                say(
                    f"  round {r + 1}: {rate.values[-1]:,.0f} vs {rate.floor[-1]:,.0f} chunks/s, "
                    f"first chunk {first.values[-1]:.2f} vs {first.floor[-1]:.2f} ms"
                )
    return [rate, first]


def _counter(counter: Any) -> float:
    """A prometheus_client Counter's value, read without a scrape."""
    return float(counter._value.get())


async def _wait_count(count: Callable[[], float], target: int, timeout: float) -> float:
    """Poll ``count()`` every 2 ms until it reaches ``target``; the time it did."""
    deadline = time.perf_counter() + timeout
    while (seen := count()) < target:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"consumed {seen:.0f} of {target} heartbeats in {timeout:g}s")
        await asyncio.sleep(0.002)
    return time.perf_counter()


async def _settled(controller: Controller, models: list[str], timeout: float = 60) -> None:
    """Wait until the joins' routing rounds are over (every model bound, no round running), so
    the timed part is the steady state of a running fleet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tasks = getattr(controller, "_tasks", [])
        busy = sum(1 for t in tasks if not t.done() and t.get_name().startswith("Task-"))
        if busy == 0 and all(controller.routing.routable(m) for m in models):
            return
        await asyncio.sleep(0.02)
    raise RuntimeError("the controller's routing did not settle after the workers joined")


async def run_heartbeats(ctx: Context) -> list[Row]:
    plan = ctx.plan
    workers, beats = plan.hb_workers, plan.hb_beats
    steady = workers * (beats - 1)
    row = Row("heartbeat ingestion", "heartbeats/s", "rate", floor_name="raw aio-pika consumer")
    row.target = Target("ratio>=", 0.8, ">= 0.8x floor")
    # The in-process controllers log every worker joining; and when one is stopped with routing
    # rounds still in flight, each of them logs a failed bind (see bench/README.md).
    for name in ("modelfleet", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    async with scenario(ctx, "heartbeats") as sc:
        settings = sc.ns.settings(
            # Nothing may be dropped or expire while the backlog is drained.
            # A long timeout: the in-process controller must not evict anyone while the
            # benchmark encodes or waits (eviction is the eviction scenario's business).
            heartbeat={
                "queue_max_length": max(steady * 2, 100_000),
                "queue_ttl_s": 600.0,
                "timeout_s": 300.0,
            },
            http={"port": 0},
        )
        fleet = SimulatedFleet(workers, plan.hb_models, prefix=f"hb{uuid.uuid4().hex[:4]}")
        sc.ns.models.update(fleet.model_names)
        connections = 2
        exchange = sc.ns.names.heartbeats
        # Per connection (a share of the workers each, so each worker's beats stay in order):
        # the first beat of every worker (they join), then the steady beats.
        joins: list[list[bytes]] = [[] for _ in range(connections)]
        steady_beats: list[list[bytes]] = [[] for _ in range(connections)]
        for c in range(connections):
            for _, seq, body in fleet.bodies(range(c, workers, connections), beats):
                frames = encode_publish(exchange, "", body, message_type="heartbeat")
                (joins if seq == 1 else steady_beats)[c].append(frames)
        size = statistics.median(len(fleet.body(i, 2)) for i in range(min(workers, 50)))
        row.note = (
            f"{workers:,} simulated workers over {plan.hb_models} models join, then "
            f"{steady:,} heartbeats ({beats - 1} each, {size:.0f} B JSON) are published by "
            f"{connections} connections with pre-encoded frames as fast as the broker takes them; "
            f"rate = steady heartbeats / (publish start -> last one consumed); the registry is "
            f"checked for every worker's last seq; "
            f"heartbeat.queue_max_length={settings.heartbeat.queue_max_length}, "
            f"queue_ttl_s={settings.heartbeat.queue_ttl_s:g}"
        )
        ctx.settings_used["heartbeats"] = {
            "heartbeat.queue_max_length": settings.heartbeat.queue_max_length,
            "heartbeat.queue_ttl_s": settings.heartbeat.queue_ttl_s,
            "heartbeat.timeout_s": settings.heartbeat.timeout_s,
            "simulated workers": workers,
            "heartbeats per worker": beats,
        }
        connection = await aio_pika.connect(ctx.url)
        try:
            channel = await connection.channel()
            await Topology(sc.ns.names).declare_base(channel)

            async def publish(parts: list[list[bytes]]) -> None:
                publishers = [await RawPublisher.connect(ctx.url) for _ in parts]
                try:
                    await asyncio.gather(
                        *(
                            p.publish_encoded(batches(e), len(e))
                            for p, e in zip(publishers, parts, strict=True)
                        )
                    )
                finally:
                    for p in publishers:
                        await p.close()

            async def timed(count: Callable[[], float]) -> float:
                """Publish the steady beats and time them until all are consumed."""
                started = time.perf_counter()
                sending = asyncio.create_task(publish(steady_beats))
                try:
                    ended = await _wait_count(count, workers + steady, timeout=300)
                finally:
                    await sending
                return steady / (ended - started)

            async def controller_rate() -> float:
                controller = Controller(settings, instance=f"bench-{uuid.uuid4().hex[:6]}")

                def received() -> float:
                    return _counter(controller.metrics.heartbeats)

                await controller.start()
                try:
                    await publish(joins)
                    await _wait_count(received, workers, timeout=300)
                    await _settled(controller, fleet.model_names)
                    rate = await timed(received)
                    stale = sum(
                        1
                        for i in range(workers)
                        if (w := controller.registry.get(fleet.worker_id(i))) is None
                        or w.seq != beats
                    )
                    if stale:
                        raise RuntimeError(f"registry not current for {stale} workers")
                    return rate
                finally:
                    await controller.stop()

            async def raw_rate(r: int) -> float:
                raw = await aio_pika.connect_robust(ctx.url)
                seen = 0

                async def on_message(_: aio_pika.abc.AbstractIncomingMessage) -> None:
                    nonlocal seen
                    seen += 1

                try:
                    raw_channel = await raw.channel()
                    queue = await raw_channel.declare_queue(sc.ns.queue(f"raw-{r}"), exclusive=True)
                    await queue.bind(exchange)
                    await queue.consume(on_message, no_ack=True)
                    await publish(joins)
                    await _wait_count(lambda: seen, workers, timeout=300)
                    return await timed(lambda: seen)
                finally:
                    await raw.close()

            for r in range(plan.rounds):
                if r % 2 == 0:
                    row.values.append(await controller_rate())
                    row.floor.append(await raw_rate(r))
                else:
                    row.floor.append(await raw_rate(r))
                    row.values.append(await controller_rate())
                say(
                    f"  round {r + 1}: controller {row.values[-1]:,.0f}/s, "
                    f"raw consumer {row.floor[-1]:,.0f}/s"
                )
        finally:
            await connection.close()
    return [row]


async def run_scale(ctx: Context) -> list[Row]:
    plan = ctx.plan
    label = f"scale, {plan.scale_workers:,} workers / {plan.scale_models:,} models"
    rss = Row(label, "controller RSS MB", "MB", target=Target("value<=", 150, "<= 150 MB"))
    sweep = Row(label, "sweep ms", "ms", target=Target("value<=", 5, "<= 5 ms"))
    plan_row = Row(label, "sweep + routing plan ms", "ms")
    models_http = Row(label, "GET /v1/models ms", "ms")
    workers_http = Row(label, "GET /v1/workers ms", "ms")
    fill = Row(label, "registry fill workers/s", "rate")
    steady = Row(label, "handle_heartbeat/s (no AMQP)", "rate")
    async with scenario(ctx, "scale") as sc:
        args = ["-m", "bench.scale", "--workers", str(plan.scale_workers)]
        args += ["--models", str(plan.scale_models), "--sweeps", str(plan.scale_sweeps)]
        args += ["--requests", str(plan.scale_requests)]
        child = sc.spawn("child", args, {})
        code = await asyncio.to_thread(child.wait, 600)
        output = child.log_path.read_text().strip().splitlines()  # type: ignore[attr-defined]
        if code != 0 or not output:
            raise RuntimeError(f"scale child exited {code}: {' | '.join(output[-5:])}")
        data = json.loads(output[-1])
    rss.values = [data["rss_after_mb"]]
    rss.note = (
        f"fresh interpreter, Controller + StatusServer, no broker connection; "
        f"{data['rss_before_mb']:.1f} MB before the fleet, +{data['rss_delta_mb']:.1f} MB for it"
    )
    sweep.values = [data["sweep"]["median_ms"]]
    sweep.note = (
        f"Controller.sweep(), median of {plan.scale_sweeps}, p99 {data['sweep']['p99_ms']:.2f} ms"
    )
    plan_row.values = [data["sweep_and_plan"]["median_ms"]]
    plan_row.note = "sweep + registry.live_models() + routing.plan(): a sweeper round without I/O"
    models_http.values = [data["models_http"]["median_ms"]]
    models_http.note = (
        f"real HTTP, keep-alive, median of {plan.scale_requests}, "
        f"p99 {data['models_http']['p99_ms']:.1f} ms, {data['models_http']['bytes']:,} B"
    )
    workers_http.values = [data["workers_http"]["median_ms"]]
    workers_http.note = f"{data['workers_http']['bytes']:,} B"
    fill.values = [data["fill_workers_per_s"]]
    fill.note = (
        f"first heartbeats of new workers: {data['fill_s']:.1f}s to register {plan.scale_workers:,}"
    )
    steady.values = [data["steady_heartbeats_per_s"]]
    steady.note = "known workers, in-process, the controller's own cost per heartbeat"
    say(
        f"  RSS {data['rss_after_mb']:.1f} MB, sweep {data['sweep']['median_ms']:.2f} ms, "
        f"/v1/models {data['models_http']['median_ms']:.1f} ms"
    )
    return [rss, sweep, plan_row, models_http, workers_http, fill, steady]


async def run_failover(ctx: Context) -> list[Row]:
    plan = ctx.plan
    row = Row("failover after SIGKILL", "s to answered", "s")
    row.target = Target("value<=", 1.0, "<= 1 s")
    jobs, concurrency = 8, 16
    async with scenario(ctx, "failover") as sc:
        # A short stop grace only speeds up the end of each round (the survivor's held jobs).
        status, env = await sc.controller(MODELFLEET_WORKER__STOP_GRACE_S="1")
        held_counts = []
        async with Client(sc.ns.settings(), timeout=60) as client:
            for r in range(plan.failover_rounds):
                model = sc.ns.model(f"fo{r}")
                victim = sc.worker(env, model, "bench.handlers:hold", concurrency)
                survivor = sc.worker(env, model, "bench.handlers:hold", concurrency)
                status.watch = [status.watch[0], victim, survivor]
                await status.wait_routable(model, 2)
                tasks = [
                    asyncio.create_task(client.submit(model, {"hold_s": 60})) for _ in range(jobs)
                ]
                try:
                    data = await status.wait(
                        "/v1/workers",
                        lambda d, v=victim.pid, s=survivor.pid: (
                            sum(w["in_flight"] for w in d["workers"] if w["pid"] in (v, s)) == jobs
                            and any(w["pid"] == v and w["in_flight"] > 0 for w in d["workers"])
                        ),
                        timeout=20,
                        what="both workers to report the jobs they hold",
                        poll=0.05,
                    )
                    held = next(w["in_flight"] for w in data["workers"] if w["pid"] == victim.pid)
                    status.watch.remove(victim)
                    killed = time.perf_counter()
                    os.kill(victim.pid, signal.SIGKILL)
                    answered = []
                    pending = set(tasks)
                    while len(answered) < held:
                        done, pending = await asyncio.wait(
                            pending, timeout=10, return_when=asyncio.FIRST_COMPLETED
                        )
                        if not done:
                            raise RuntimeError(
                                f"{len(answered)} of the {held} jobs the victim held were "
                                "answered within 10 s of the kill"
                            )
                        for task in done:
                            result = task.result()
                            if result["attempt"] < 2 or result["pid"] != survivor.pid:
                                raise RuntimeError(f"unexpected answer {result}")
                            answered.append(time.perf_counter() - killed)
                    row.values.append(max(answered))
                    held_counts.append(held)
                    say(
                        f"  round {r + 1}: {held} job(s) of the killed worker answered by the "
                        f"other {min(answered):.3f}-{max(answered):.3f}s after SIGKILL"
                    )
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    Processes.stop([victim, survivor])
    row.note = (
        f"{jobs} jobs that hold 60 s on first delivery and answer at once on redelivery, "
        f"2 workers --concurrency {concurrency}; time until the last of the killed worker's "
        f"jobs ({'/'.join(map(str, held_counts))} per round) is answered; slowest "
        f"{max(row.values):.3f}s"
    )
    return [row]


async def run_eviction(ctx: Context) -> list[Row]:
    plan = ctx.plan
    timeout = DEFAULTS.heartbeat.timeout_s
    row = Row("eviction after SIGSTOP", "s to evicted", "s")
    row.target = Target("value<=", timeout + 1, f"<= {timeout + 1:g} s (timeout + 1)")
    silence = []
    async with scenario(ctx, "eviction") as sc:
        status, env = await sc.controller()
        model = sc.ns.model("evict")
        survivor = sc.worker(env, model, "modelfleet.handlers:echo", 4)
        status.watch.append(survivor)
        for r in range(plan.eviction_rounds):
            victim = sc.worker(env, model, "modelfleet.handlers:echo", 4)
            status.watch.append(victim)
            await status.wait_routable(model, 2)
            data = await status.get("/v1/workers")
            age = next(
                (w["last_heartbeat_age_s"] for w in data["workers"] if w["pid"] == victim.pid), 0
            )
            status.watch.remove(victim)
            os.kill(victim.pid, signal.SIGSTOP)
            stopped = time.perf_counter()
            try:
                await status.wait(
                    "/v1/workers",
                    lambda d, v=victim.pid: all(w["pid"] != v for w in d["workers"]),
                    timeout=timeout + 10,
                    what="the eviction of the stopped worker",
                    poll=0.01,
                )
                row.values.append(time.perf_counter() - stopped)
                silence.append(row.values[-1] + age)
                say(f"  round {r + 1}: evicted {row.values[-1]:.3f}s after SIGSTOP")
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim.pid, signal.SIGKILL)  # works on a stopped process
                victim.wait()
    hb = DEFAULTS.heartbeat
    row.note = (
        f"defaults: heartbeat.interval_s={hb.interval_s:g}, timeout_s={hb.timeout_s:g}, "
        f"sweep_interval_s={hb.sweep_interval_s:g}; polled /v1/workers every 10 ms; "
        f"the worker had been silent {statistics.median(silence):.2f}s (median) when evicted; "
        f"slowest eviction {max(row.values):.3f}s after SIGSTOP"
    )
    return [row]


RUNNERS: dict[str, Callable[[Context], Awaitable[list[Row]]]] = {
    "e2e": run_e2e,
    "ceiling": run_ceiling,
    "streaming": run_streaming,
    "heartbeats": run_heartbeats,
    "scale": run_scale,
    "failover": run_failover,
    "eviction": run_eviction,
}

# The rows each scenario prints, also when it fails (so the table always has them).
ROW_NAMES = {
    "e2e": [
        ("e2e, 64 in flight", "jobs/s"),
        ("e2e, 256 in flight", "jobs/s"),
        ("latency, 1 in flight", "p50 ms"),
    ],
    "ceiling": [("broker ceiling, quorum queue", "msgs/s")],
    "streaming": [("streaming, 200 chunks", "chunks/s")],
    "heartbeats": [("heartbeat ingestion", "heartbeats/s")],
    "scale": [("scale", "controller RSS MB"), ("scale", "sweep ms")],
    "failover": [("failover after SIGKILL", "s to answered")],
    "eviction": [("eviction after SIGSTOP", "s to evicted")],
}


# -- machine -------------------------------------------------------------------------------


async def rabbitmq_version(url: str) -> str:
    connection = await aio_pika.connect(url)
    try:
        props = connection.transport.connection.server_properties  # type: ignore[union-attr]
        version = props.get("version", "?")
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        await connection.close()


def machine_facts() -> dict[str, Any]:
    with open("/proc/meminfo") as meminfo:
        total_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "memory_gib": round(total_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "modelfleet": __version__,
        "commit": commit or "?",
    }


# -- main ----------------------------------------------------------------------------------


async def main_async(
    args: argparse.Namespace, procs: Processes, info: dict[str, Any], document: dict[str, Any]
) -> int:
    plan = Plan.build(args.quick, args.rounds, args.concurrency)
    selected = [s.strip() for s in args.only.split(",")] if args.only else list(SCENARIOS)
    unknown = sorted(set(selected) - set(SCENARIOS))
    if unknown:
        say(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
        return 2
    try:
        info["rabbitmq"] = await asyncio.wait_for(rabbitmq_version(args.url), 15)
    except Exception as exc:
        say(f"cannot reach RabbitMQ at {args.url}: {exc or type(exc).__name__}")
        return 2
    ctx = Context(url=args.url, plan=plan, procs=procs)
    say(
        f"modelfleet bench — {'quick' if plan.quick else 'full'} mode, {plan.rounds} round(s); "
        f"{info['date']}; {info['cpus']} CPUs, {info['memory_gib']} GiB; RabbitMQ "
        f"{info['rabbitmq']}; Python {info['python']}; modelfleet {info['modelfleet']} "
        f"({info['commit']}); logs in {procs.logs}"
    )
    rows: list[Row] = []
    failed = False
    started = time.monotonic()
    for key in SCENARIOS:
        if key not in selected:
            continue
        began = time.monotonic()
        try:
            rows += await RUNNERS[key](ctx)
        except Exception as exc:
            failed = True
            detail = f"{type(exc).__name__}: {exc}"
            say(f"  {key} FAILED: {detail}")
            traceback.print_exc()
            for scenario_name, metric in ROW_NAMES[key]:
                rows.append(Row(scenario_name, metric, "s", error=detail[:300]))
        say(f"  ({key} took {time.monotonic() - began:.0f}s)")
    say(f"\nmodelfleet bench results ({info['date']}, {time.monotonic() - started:.0f}s)\n")
    say(render_table(rows))
    say("\nsettings used:")
    say(f"  worker --concurrency {plan.concurrency} (modelfleet) = prefetch (naive), rounds")
    for key, used in ctx.settings_used.items():
        say(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in used.items()))
    document.update(
        machine=info,
        plan=plan.__dict__,
        settings=ctx.settings_used,
        rows=[r.as_dict() for r in rows],
        table=render_table(rows),
    )
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.run", description="modelfleet benchmark: each scenario beside its floor"
    )
    parser.add_argument("--quick", action="store_true", help="1 round, small sizes (CI)")
    parser.add_argument("--rounds", type=int, help="rounds per scenario (default 5; quick 1)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--only", metavar="LIST", help=f"comma-separated subset of: {','.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="jobs per worker at once, modelfleet and naive alike (default 32)",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("MODELFLEET_TEST_AMQP_URL")
        or os.environ.get("MODELFLEET_AMQP__URL")
        or DEFAULT_URL,
        help="RabbitMQ URL (default: $MODELFLEET_TEST_AMQP_URL, $MODELFLEET_AMQP__URL, local)",
    )
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs = Processes(Path(tempfile.mkdtemp(prefix="modelfleet-bench-")))
    signal.signal(signal.SIGTERM, _terminate)
    document: dict[str, Any] = {}
    try:
        code = asyncio.run(main_async(args, procs, machine_facts(), document))
    except KeyboardInterrupt:
        code = 130
    finally:
        procs.stop_all()
    if args.json and document:
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        say(f"\nwrote {args.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())
