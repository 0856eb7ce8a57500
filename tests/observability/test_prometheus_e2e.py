"""End to end: a real Prometheus (Debian's ``prometheus`` binary) scrapes a real controller with
workers under load, and RabbitMQ's rabbitmq_prometheus endpoint; every panel query of the dashboard,
with ``$model`` set to the model under load, must return data."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import pytest
import yaml

from tests.conftest import Namespace
from tests.observability.conftest import keep_loading, start_fleet_under_load
from tests.observability.dashboard import Query, load_dashboard, queries, require_tool, substitute
from tests.process.conftest import Fleet, free_port

pytestmark = pytest.mark.process

SCRAPE_INTERVAL = "1s"
# rate() over [1m] needs two samples in the window; histogram_quantile and increase() likewise.
# A few scrapes suffice; the deadline only bounds a failing run.
DATA_DEADLINE_S = 45.0


class Prometheus:
    """One ``prometheus`` process on a free port with its own config and storage; stopped by PID."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, jobs: dict[str, tuple[str, str]]) -> None:
        """``jobs``: job name -> (host:port, metrics path)."""
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "scrape_configs": [
                {"job_name": job, "metrics_path": path, "static_configs": [{"targets": [target]}]}
                for job, (target, path) in jobs.items()
            ],
        }
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Prometheus]:
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    server = Prometheus(require_tool("prometheus"), workdir)
    try:
        yield server
    finally:
        server.stop()


async def api(session: aiohttp.ClientSession, base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urlencode(params)}" if params else f"{base}{path}"
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
        body = await response.text()
        if response.status != 200:
            raise AssertionError(f"GET {path} {params}: HTTP {response.status}: {body[:500]}")
        return json.loads(body)


async def wait_ready(session: aiohttp.ClientSession, prometheus: Prometheus, within: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        assert prometheus.proc is not None
        if prometheus.proc.poll() is not None:
            pytest.fail(
                f"prometheus exited with {prometheus.proc.returncode}:\n{prometheus.log_tail()}"
            )
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with session.get(f"{prometheus.url}/-/ready") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.2)
    pytest.fail(f"prometheus not ready after {within}s:\n{prometheus.log_tail()}")


async def test_every_panel_query_returns_data(
    ns: Namespace, fleet: Fleet, prometheus: Prometheus, rabbitmq_metrics_url: str
) -> None:
    load = await start_fleet_under_load(fleet, ns)
    rabbit = urlsplit(rabbitmq_metrics_url)
    prometheus.start(
        {
            "modelfleet-controller": (f"127.0.0.1:{fleet.port}", "/metrics"),
            "rabbitmq": (rabbit.netloc, rabbit.path or "/metrics"),
        }
    )
    panel_queries: list[Query] = queries(load_dashboard())
    pending = {q: substitute(q.expr, model=load.model) for q in panel_queries}

    stop = asyncio.Event()
    background = asyncio.create_task(keep_loading(ns, load.model, stop))
    loop = asyncio.get_running_loop()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, prometheus, within=20)
            deadline = loop.time() + DATA_DEADLINE_S
            # both targets scraped and healthy first: a failing scrape would explain everything
            while True:
                up = await api(session, prometheus.url, "/api/v1/query", query="up")
                health = {s["metric"]["job"]: s["value"][1] for s in up["data"]["result"]}
                if health == {"modelfleet-controller": "1", "rabbitmq": "1"}:
                    break
                if loop.time() > deadline:
                    targets = await api(session, prometheus.url, "/api/v1/targets")
                    pytest.fail(f"scrape targets not up: {health}\n{json.dumps(targets)[:3000]}")
                await asyncio.sleep(0.5)
            while pending and loop.time() < deadline:
                for query, promql in list(pending.items()):
                    answer = await api(session, prometheus.url, "/api/v1/query", query=promql)
                    assert answer["status"] == "success", f"{query}: {answer}"
                    if answer["data"]["result"]:
                        del pending[query]
                if pending:
                    await asyncio.sleep(1)
    finally:
        stop.set()
        sent = await background
    assert sent > 0
    assert not pending, (
        f"{len(pending)} of {len(panel_queries)} panel queries returned no data after "
        f"{DATA_DEADLINE_S:.0f}s (model {load.model}):\n"
        + "\n".join(f"  {query}\n    sent: {promql}" for query, promql in pending.items())
    )
