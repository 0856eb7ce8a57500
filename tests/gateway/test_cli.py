"""``modelfleet gateway`` and ``modelfleet worker --upstream`` as real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Namespace
from tests.gateway.support import UpstreamProcess, free_port
from tests.helpers import wait_for


class Processes:
    def __init__(self, ns: Namespace, logs: Path) -> None:
        self.logs = logs
        self.status_port = free_port()
        self.env = {
            **os.environ,
            **ns.env(),
            "MODELFLEET_HTTP__PORT": str(self.status_port),
            "MODELFLEET_GATEWAY__API_KEYS": "sk-cli-1,sk-cli-2",
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "modelfleet", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def processes(ns: Namespace, tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(ns, tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


async def test_gateway_and_upstream_worker_commands(
    ns: Namespace, processes: Processes, tmp_path: Path
) -> None:
    upstream = UpstreamProcess(tmp_path).start()
    try:
        model = ns.model("cli")
        gateway_port = free_port()
        processes.spawn("controller", "controller")
        worker = processes.spawn(
            "worker", "worker", "--model", model, "--upstream", upstream.url, "--concurrency", "2"
        )
        gateway = processes.spawn(
            "gateway",
            "gateway",
            "--port",
            str(gateway_port),
            "--controller-url",
            f"http://127.0.0.1:{processes.status_port}",
        )
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{gateway_port}/v1",
            api_key="sk-cli-2",
            max_retries=0,
            timeout=10,
        )
        try:

            async def model_listed() -> bool:
                try:
                    return [m.id for m in (await client.models.list()).data] == [model]
                except openai.APIError:
                    return False

            await wait_for(model_listed, timeout=30, what=f"{model} listed by the gateway")
            reply = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "through every process"}]
            )
            assert reply.choices[0].message.content == "through every process"
            async with httpx.AsyncClient() as http:
                unauthorised = await http.get(f"http://127.0.0.1:{gateway_port}/v1/models")
                assert unauthorised.status_code == 401  # keys from MODELFLEET_GATEWAY__API_KEYS
        finally:
            await client.close()

        for proc in (gateway, worker):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, processes.log("gateway")
        gateway_log = processes.log("gateway")
        assert "OpenAI-compatible gateway on" in gateway_log
        # Its own request lines, not httpx's lines about its calls to the status API.
        assert "GET /v1/models status=200" in gateway_log
        assert "HTTP Request:" not in gateway_log, gateway_log
    finally:
        upstream.stop()


def test_worker_upstream_flags_are_checked(processes: Processes) -> None:
    bad_url = processes.spawn("bad-url", "worker", "--model", "m", "--upstream", "ftp://x/v1")
    assert bad_url.wait(timeout=20) == 2
    assert "must look like http://host:port/v1" in processes.log("bad-url")
    both = processes.spawn(
        "both",
        "worker",
        "--model",
        "m",
        "--upstream",
        "http://127.0.0.1:1/v1",
        "--handler",
        "modelfleet.handlers:fake_llm",
    )
    assert both.wait(timeout=20) == 2
    assert "--upstream and --handler exclude each other" in processes.log("both")


def test_gateway_on_a_busy_port_or_a_foreign_host_is_one_line_and_exit_2(
    processes: Processes,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        busy = processes.spawn("busy", "gateway", "--port", str(port))
        assert busy.wait(timeout=30) == 2, processes.log("busy")
    # stderr is no terminal here: the one line is the JSON form of the failure.
    [line] = processes.log("busy").splitlines()
    assert json.loads(line) == {
        "error": "CONFIG_ERROR",
        "message": f"gateway.port {port} on 127.0.0.1 is in use (another gateway?): pick "
        "another with --port or gateway.port",
    }
    # 192.0.2.1 (TEST-NET-1) is no address of this machine.
    foreign = processes.spawn("foreign", "gateway", "--host", "192.0.2.1", "--port", "0")
    assert foreign.wait(timeout=30) == 2, processes.log("foreign")
    [line] = processes.log("foreign").splitlines()
    failure = json.loads(line)
    assert failure["error"] == "CONFIG_ERROR"
    assert failure["message"].startswith("gateway.host 192.0.2.1 cannot be bound (")
    assert failure["message"].endswith("with --host or gateway.host")
