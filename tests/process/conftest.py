"""Fixtures that run ``modelfleet controller`` / ``modelfleet worker`` as real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Namespace


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Fleet:
    """Subprocesses of one test, all in the test's namespace; every one stopped at teardown."""

    def __init__(self, ns: Namespace, logs: Path) -> None:
        self.ns = ns
        self.logs = logs
        self.port = free_port()
        self.env = {**os.environ, **ns.env(), "MODELFLEET_HTTP__PORT": str(self.port)}
        self.procs: list[subprocess.Popen[bytes]] = []
        self._session: aiohttp.ClientSession | None = None

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self, name: str, *args: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}-{len(self.procs)}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "modelfleet", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
            )
        self.procs.append(proc)
        return proc

    def controller(self) -> subprocess.Popen[bytes]:
        return self.spawn("controller", "controller")

    def worker(
        self, model: str, handler: str = "modelfleet.handlers:fake_llm", concurrency: int = 4
    ) -> subprocess.Popen[bytes]:
        return self.spawn(
            "worker",
            "worker",
            "--model",
            model,
            "--handler",
            handler,
            "--concurrency",
            str(concurrency),
        )

    def run_cli(
        self, *args: str, stdin: str | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a short ``modelfleet`` command to completion (in a thread from async tests)."""
        return subprocess.run(
            [sys.executable, "-m", "modelfleet", *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    async def get(self, path: str) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.get(
            self.status_url + path, timeout=aiohttp.ClientTimeout(total=2)
        ) as r:
            return await r.json()

    async def get_text(self, path: str) -> str:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.get(
            self.status_url + path, timeout=aiohttp.ClientTimeout(total=2)
        ) as response:
            return await response.text()

    async def wait(self, path: str, check: Any, *, timeout: float = 20, what: str = "") -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Any = None
        while loop.time() < deadline:
            try:
                last = await self.get(path)
                if check(last):
                    return last
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(0.05)
        pytest.fail(f"timed out after {timeout}s waiting for {what or path}; last answer {last}")

    async def wait_routable(self, model: str, workers: int, timeout: float = 20) -> None:
        await self.wait(
            "/v1/models",
            lambda d: any(
                m["name"] == model and m["workers"] == workers and m["routable"]
                for m in d["models"]
            ),
            timeout=timeout,
            what=f"{model} routable with {workers} worker(s)",
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        for proc in self.procs:
            if proc.poll() is None:
                with_stop = proc
                try:
                    with_stop.send_signal(signal.SIGCONT)
                    with_stop.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_tail(self) -> str:
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)


@pytest.fixture
async def fleet(ns: Namespace, tmp_path: Path) -> AsyncIterator[Fleet]:
    group = Fleet(ns, tmp_path)
    try:
        yield group
    finally:
        await group.close()


@pytest.fixture
def cli_env(ns: Namespace) -> Iterator[dict[str, str]]:
    yield {**os.environ, **ns.env()}


def parse_json_line(text: str) -> Any:
    return json.loads(text.strip().splitlines()[-1])


def fetch_sync(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())
