"""Helpers for the gateway tests: a real fleet (controller with its status API, workers, the
gateway) on the real broker in the test's namespace, an official ``openai`` client pointed at
it, and the fake OpenAI-compatible upstream server run as a real process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from modelfleet.config import Settings
from modelfleet.gateway import Gateway
from modelfleet.service import ControllerService, build_controller
from modelfleet.upstream import UpstreamWorker
from modelfleet.worker import Handler, Worker
from tests.conftest import Namespace
from tests.helpers import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Stack:
    """A controller (status API on a free port), the gateway in front of it, and the workers a
    test adds; everything on ``ns``, stopped in reverse order."""

    def __init__(self, ns: Namespace, settings: Settings, exit_stack: AsyncExitStack) -> None:
        self.ns = ns
        self.settings = settings
        self._stack = exit_stack
        self.service: ControllerService | None = None
        self.gateway: Gateway | None = None
        self.workers: list[Worker] = []

    @property
    def controller_service(self) -> ControllerService:
        assert self.service is not None
        return self.service

    @property
    def url(self) -> str:
        assert self.gateway is not None
        return self.gateway.url

    async def start(self) -> None:
        self.service = build_controller(self.settings)
        await self.service.start()
        self._stack.push_async_callback(self.service.stop)
        self.gateway = Gateway(self.settings, controller_url=self.service.server.url)
        await self.gateway.start()
        self._stack.push_async_callback(self.gateway.stop)

    def openai(self, api_key: str = "not-checked", **options: Any) -> AsyncOpenAI:
        """The official client on the gateway: no retries (each error must show as it is)."""
        client = AsyncOpenAI(
            base_url=f"{self.url}/v1",
            api_key=api_key,
            max_retries=0,
            timeout=options.pop("timeout", 20.0),
            **options,
        )
        self._stack.push_async_callback(client.close)
        return client

    def http(self) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=self.url, timeout=20.0)
        self._stack.push_async_callback(client.aclose)
        return client

    async def wait_routable(self, model: str, *, routable: bool = True) -> None:
        controller = self.controller_service.controller
        await wait_for(
            lambda: controller.routing.routable(model) is routable,
            timeout=10,
            what=f"{model} routable={routable}",
        )

    async def add_worker(
        self,
        handler: Handler,
        model: str,
        *,
        concurrency: int | None = None,
        worker_id: str | None = None,
    ) -> Worker:
        worker = Worker(
            handler,
            [model],
            settings=self.settings,
            concurrency=concurrency,
            worker_id=worker_id or f"worker-{len(self.workers) + 1}",
            install_signal_handlers=False,
        )
        await worker.start()
        self._stack.push_async_callback(worker.stop)
        self.workers.append(worker)
        await self.wait_routable(model)
        return worker

    async def add_upstream_worker(
        self, url: str, model: str, *, concurrency: int | None = None, **options: Any
    ) -> UpstreamWorker:
        served = UpstreamWorker(
            self.settings,
            [model],
            url,
            concurrency=concurrency,
            worker_id=f"upstream-{len(self.workers) + 1}",
            install_signal_handlers=False,
            **options,
        )
        await served.start()
        self._stack.push_async_callback(served.stop)
        self.workers.append(served.worker)
        return served


def gateway_settings(ns: Namespace, **overrides: Any) -> Settings:
    """The namespace's fast settings, the status API and the gateway on free ports."""
    gateway = {"port": 0, "timeout_s": 10.0, **overrides.pop("gateway", {})}
    return ns.settings(gateway=gateway, **overrides)


@asynccontextmanager
async def stack(ns: Namespace, **overrides: Any) -> AsyncIterator[Stack]:
    async with AsyncExitStack() as exit_stack:
        built = Stack(ns, gateway_settings(ns, **overrides), exit_stack)
        await built.start()
        yield built


def sse_lines(text: str) -> list[str]:
    """The ``data:`` payloads of a server-sent events body, in order."""
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


# -- the fake upstream as a real process -----------------------------------------------------------


class UpstreamProcess:
    """``python -m tests.gateway.fake_upstream`` on a port of its own."""

    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_dir / f"fake-upstream-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, within: float = 20.0) -> UpstreamProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.gateway.fake_upstream", "--port", str(self.port)],
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + within
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"fake upstream exited with {self.proc.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"fake upstream did not answer within {within}s: {self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the server dies at once, mid-response if it was answering."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()

    async def stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"{self.base}/stats")
            response.raise_for_status()
            data: dict[str, Any] = response.json()
            return data

    async def set_healthy(self, healthy: bool) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{self.base}/admin/health", json={"healthy": healthy})
            response.raise_for_status()
