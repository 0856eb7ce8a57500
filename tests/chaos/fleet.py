"""The chaos soak's machinery: the broker node it may restart, the fleet of subprocesses it
starts (and always stops), the controller's status API, and a tap on the heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import aiormq

from modelfleet.topology import Names

__all__ = [
    "Fleet",
    "HeartbeatTap",
    "Node",
    "Status",
    "exchange_exists",
    "free_port",
    "on_channel",
    "queue_counts",
    "until",
]

_T = TypeVar("_T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the broker node ------------------------------------------------------------------------


class Node:
    """rabbitmqctl against the soak's own node (``-n``; the default node when unset)."""

    def __init__(self, name: str | None) -> None:
        self.name = name or None
        self.app_stopped = False

    def ctl(self, *args: str) -> str:
        ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
        node = ["-n", self.name] if self.name else []
        done = subprocess.run(
            [ctl, *node, *args], check=True, capture_output=True, text=True, timeout=120
        )
        return done.stdout

    def rows(self, *args: str) -> list[dict[str, Any]]:
        out = self.ctl("-q", *args, "--formatter", "json").strip()
        rows = json.loads(out) if out else []
        return rows if isinstance(rows, list) else []

    def check_serves(self, url: str) -> None:
        """Refuse to run unless this node is the one behind ``url``: the soak stops its app."""
        port = urlsplit(url).port or 5672
        status = json.loads(self.ctl("-q", "status", "--formatter", "json"))
        ports = {
            int(item.get("port", 0))
            for item in status.get("listeners", [])
            if str(item.get("protocol", "")).startswith("amqp")
        }
        if port not in ports:
            raise RuntimeError(
                f"rabbitmqctl node {self.name or '(default)'} listens on {sorted(ports)}, not on "
                f"the soak's port {port}: set CHAOS_NODE (or --node) to the node of "
                "that broker (the soak restarts it)"
            )


async def on_channel(url: str, operation: Callable[[Any], Awaitable[_T]]) -> _T:
    """Run ``operation(channel)`` on a short-lived plain connection of the soak's own (a channel
    error there disturbs nobody)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        return await operation(channel)
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


async def exchange_exists(url: str, name: str) -> bool:
    async def passive(channel: Any) -> bool:
        try:
            await channel.declare_exchange(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True

    return await on_channel(url, passive)


async def queue_counts(url: str, name: str) -> tuple[int, int] | None:
    async def passive(channel: Any) -> tuple[int, int] | None:
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        result = queue.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    return await on_channel(url, passive)


async def until(
    condition: Callable[[], Awaitable[bool]], timeout_s: float, every_s: float = 0.1
) -> float | None:
    """Seconds until ``condition()`` held, or None if it did not within ``timeout_s``."""
    start = time.monotonic()
    while True:
        with contextlib.suppress(Exception):
            if await condition():
                return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            return None
        await asyncio.sleep(every_s)


# -- processes ------------------------------------------------------------------------------


class Fleet:
    """The controller and the workers, as subprocesses; every one started is stopped at the end."""

    def __init__(
        self, env: dict[str, str], logs: Path, *, models: tuple[str, ...], concurrency: int
    ) -> None:
        self.env = env
        self.logs = logs
        self.models = models
        self.concurrency = concurrency
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.controller: subprocess.Popen[bytes] | None = None
        self.started: list[subprocess.Popen[bytes]] = []
        self.killed: set[int] = set()  # pids SIGKILLed: their jobs may legitimately redeliver
        self.deaths: list[float] = []  # when (monotonic) a kill or broker restart happened
        self.log_paths: dict[int, Path] = {}
        self._count = 0

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        self._count += 1
        path = self.logs / f"{name}-{self._count}.log"
        with path.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "modelfleet", *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.started.append(proc)
        self.log_paths[proc.pid] = path
        return proc

    def start_worker(self, worker_id: str) -> subprocess.Popen[bytes]:
        args = ["worker", "--handler", "tests.chaos.handlers:record"]
        args += ["--concurrency", str(self.concurrency), "--worker-id", worker_id]
        for model in self.models:
            args += ["--model", model]
        proc = self.spawn(f"worker-{worker_id}", *args)
        self.workers[worker_id] = proc
        return proc

    def start_controller(self) -> subprocess.Popen[bytes]:
        self.controller = self.spawn("controller", "controller")
        return self.controller

    async def kill(self, worker_id: str) -> int:
        proc = self.workers[worker_id]
        self.killed.add(proc.pid)
        self.deaths.append(time.monotonic())
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        return proc.pid

    def check_alive(self) -> None:
        """Raise if the controller or a worker exited on its own (say it cannot even start)."""
        current = [*self.workers.values(), *([self.controller] if self.controller else [])]
        for proc in current:
            if proc.poll() is not None:
                lines = self.log_paths[proc.pid].read_text(errors="replace").strip().splitlines()
                raise RuntimeError(
                    f"{self.log_paths[proc.pid].stem} (pid {proc.pid}) exited {proc.returncode}: "
                    + (lines[-1] if lines else "no output")
                )

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                    proc.send_signal(signal.SIGTERM)
        for proc in self.started:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Status:
    """The controller's status API (whichever controller process serves the port now)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        return self._session

    async def workers(self) -> list[dict[str, Any]] | None:
        try:
            async with self._client().get(f"{self.base}/v1/workers") as response:
                if response.status != 200:
                    return None
                body = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        workers = body.get("workers") if isinstance(body, dict) else None
        return workers if isinstance(workers, list) else None

    async def healthy(self) -> bool:
        try:
            async with self._client().get(f"{self.base}/healthz") as response:
                body = await response.json()
                return response.status == 200 and bool(body.get("healthy"))
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class HeartbeatTap:
    """The soak's own copy of the heartbeats: when a restarted worker first spoke."""

    def __init__(self, url: str, names: Names) -> None:
        self.url = url
        self.names = names
        self.first: dict[tuple[str, int], float] = {}
        self._connection: Any = None
        self._queue: Any = None

    async def open(self) -> None:
        self._connection = await aio_pika.connect_robust(self.url)
        channel = await self._connection.channel()
        self._queue = await channel.declare_queue(
            f"{self.names.ns}.soak.heartbeats", auto_delete=True, arguments={"x-message-ttl": 5000}
        )
        await self._queue.bind(self.names.heartbeats)
        await self._queue.consume(self._on_message, no_ack=True)

    async def rebind(self) -> None:
        """After ``{ns}.heartbeats`` was deleted and declared again."""
        if self._queue is not None:
            await self._queue.bind(self.names.heartbeats)

    async def _on_message(self, message: Any) -> None:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            body = json.loads(message.body)
            key = (str(body["worker_id"]), int(body["pid"]))
            self.first.setdefault(key, time.monotonic())

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
