"""``modelfleet demo``: a bounded tour of the whole job path with real processes.

It starts a controller and two ``fake_llm`` workers as subprocesses in a fresh namespace, then
shows a burst of jobs, a streamed job, a fast NO_WORKER error, and a worker SIGKILLed in the
middle of a burst with every job still answered. It cleans up after itself and exits 0 when
everything behaved, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aio_pika

from modelfleet.client import Client
from modelfleet.config import Settings
from modelfleet.errors import JobError, NoWorkerError
from modelfleet.topology import Names, Topology

MODEL = "demo-llm"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _say(text: str) -> None:
    print(text, flush=True)


class _Fleet:
    """The demo's subprocesses, with their logs in one folder."""

    def __init__(self, settings: Settings, namespace: str, port: int) -> None:
        self.logs = Path(tempfile.mkdtemp(prefix="modelfleet-demo-"))
        self.env = {
            **os.environ,
            "MODELFLEET_NAMESPACE": namespace,
            "MODELFLEET_AMQP__URL": settings.amqp.url,
            "MODELFLEET_HTTP__PORT": str(port),
            "MODELFLEET_HEARTBEAT__INTERVAL": "0.5",
            "MODELFLEET_HEARTBEAT__TIMEOUT": "2",
            "MODELFLEET_ROUTING__NO_WORKER_GRACE_S": "1",
            "MODELFLEET_LOG_LEVEL": "INFO",
        }
        self.status_url = f"http://127.0.0.1:{port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "modelfleet", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = proc
        return proc

    def status(self, path: str) -> Any:
        with urllib.request.urlopen(self.status_url + path, timeout=2) as response:
            return json.loads(response.read())

    async def wait_status(self, path: str, check: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                data = await asyncio.to_thread(self.status, path)
                if check(data):
                    return data
            for name, proc in self.procs.items():
                if proc.poll() is not None and name != "worker-1":
                    raise RuntimeError(f"{name} exited early; see {self.logs / (name + '.log')}")
            await asyncio.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}; logs in {self.logs}")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _cleanup(settings: Settings, names: Names) -> None:
    connection = await aio_pika.connect(settings.amqp.url)
    try:
        channel = await connection.channel()
        await Topology(names).delete(channel, [MODEL, "no-such-model"])
    finally:
        await connection.close()


async def run_demo(settings: Settings, *, jobs: int = 200) -> int:
    namespace = f"demo-{uuid.uuid4().hex[:8]}"
    names = Names(namespace)
    fleet = _Fleet(settings, namespace, _free_port())
    summary: list[tuple[str, str]] = []
    ok = True
    _say(f"modelfleet demo — namespace {namespace}, logs in {fleet.logs}")
    try:
        fleet.start("controller", "controller")
        await fleet.wait_status("/v1/workers", lambda d: "workers" in d, 20, "the controller")
        for i in (1, 2):
            fleet.start(
                f"worker-{i}", "worker", "--model", MODEL,
                "--handler", "modelfleet.handlers:fake_llm", "--concurrency", "8",
            )  # fmt: skip
        await fleet.wait_status(
            "/v1/models",
            lambda d: any(
                m["name"] == MODEL and m["workers"] == 2 and m["routable"] for m in d["models"]
            ),
            30,
            "two routable workers",
        )
        _say(f"1. controller and 2 fake_llm workers up; {MODEL} is routable")

        client_settings = settings.model_copy(update={"namespace": namespace})
        async with Client(client_settings, timeout=60) as client:
            # -- a burst ---------------------------------------------------------------
            started = time.monotonic()
            prompt = {"prompt": "the quick brown fox jumps over the lazy dog"}
            results = await asyncio.gather(*(client.submit(MODEL, prompt) for _ in range(jobs)))
            took = time.monotonic() - started
            good = sum(1 for r in results if r["text"] == prompt["prompt"])
            ok &= good == jobs
            _say(f"2. burst: {good}/{jobs} jobs answered in {took:.2f}s ({jobs / took:.0f} jobs/s)")
            summary.append(("burst", f"{good}/{jobs} answered, {jobs / took:.0f} jobs/s"))

            # -- a stream --------------------------------------------------------------
            _say("3. streamed job: ")
            started = time.monotonic()
            first: float | None = None
            stream = client.stream(MODEL, {"prompt": "streaming one word at a time", "delay": 0.1})
            async for chunk in stream:
                first = first or time.monotonic() - started
                print(f"   chunk {chunk['text']!r}", flush=True)
            ok &= stream.result["text"] == "streaming one word at a time"
            _say(f"   final result {stream.result['text']!r} (first chunk after {first or 0:.3f}s)")
            summary.append(
                ("stream", f"{stream.result['words']} chunks, first after {first or 0:.3f}s")
            )

            # -- no worker -------------------------------------------------------------
            started = time.monotonic()
            try:
                await client.submit("no-such-model", {"prompt": "hello"})
                ok = False
                _say("4. no-worker: UNEXPECTED success")
            except NoWorkerError as exc:
                took = time.monotonic() - started
                _say(
                    f"4. no-worker: {exc.code.name} ({int(exc.code)}) "
                    f"after {took * 1000:.0f} ms: {exc.message}"
                )
                summary.append(
                    ("no worker", f"NoWorkerError {int(exc.code)} in {took * 1000:.0f} ms")
                )

            # -- kill a worker mid-burst -----------------------------------------------
            slow = {"prompt": "one two three four five", "delay": 0.05}
            count = max(40, jobs // 4)
            tasks = [asyncio.create_task(client.submit(MODEL, slow)) for _ in range(count)]
            victim = fleet.procs["worker-1"]
            held = 0
            with contextlib.suppress(Exception):
                data = await fleet.wait_status(
                    "/v1/workers",
                    lambda d: any(
                        w["pid"] == victim.pid and w["in_flight"] > 0 for w in d["workers"]
                    ),
                    10,
                    "worker-1 to hold jobs",
                )
                held = next(w["in_flight"] for w in data["workers"] if w["pid"] == victim.pid)
            victim.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            answered = sum(
                1 for r in outcomes if isinstance(r, dict) and r.get("text") == slow["prompt"]
            )
            failed = [r for r in outcomes if isinstance(r, JobError)]
            ok &= answered == count
            _say(
                f"5. SIGKILLed worker-1 (pid {victim.pid}) holding {held} job(s): "
                f"{answered}/{count} jobs answered, {len(failed)} failed, "
                f"all done {time.monotonic() - killed_at:.2f}s after the kill"
            )
            summary.append(("worker killed", f"{answered}/{count} answered (it held {held})"))
            await fleet.wait_status(
                "/v1/workers",
                lambda d: all(w["pid"] != victim.pid for w in d["workers"]),
                10,
                "eviction of the killed worker",
            )
            evicted_after = time.monotonic() - killed_at
            _say(f"6. the controller evicted worker-1 {evicted_after:.1f}s after the kill")
            summary.append(("eviction", f"{evicted_after:.1f}s after SIGKILL (timeout 2s)"))
    except Exception as exc:
        ok = False
        _say(f"demo failed: {type(exc).__name__}: {exc}")
    finally:
        fleet.stop_all()
        with contextlib.suppress(Exception):
            await _cleanup(settings, names)
    _say("\nsummary")
    width = max((len(k) for k, _ in summary), default=0)
    for key, value in summary:
        _say(f"  {key.ljust(width)}  {value}")
    _say("demo " + ("passed" if ok else f"FAILED (logs in {fleet.logs})"))
    return 0 if ok else 1
