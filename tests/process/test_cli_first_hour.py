"""The first hour of a new user: every wrong turn ends in a named error at once, in words a
person reads on a terminal and in JSON for a program (issue 11)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import Namespace
from tests.process.conftest import Fleet, parse_json_line

pytestmark = pytest.mark.process


@pytest.fixture
async def other_ns(amqp_url: str) -> AsyncIterator[Namespace]:
    """A second namespace, where no controller runs."""
    namespace = Namespace(amqp_url)
    yield namespace
    await namespace.cleanup()


async def _cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(fleet.run_cli, *args)


async def _wait_for_log(path_glob: str, fleet: Fleet, text: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in fleet.logs.glob(path_glob):
            content = path.read_text(errors="replace")
            if text in content:
                return content
        await asyncio.sleep(0.1)
    pytest.fail(f"no {text!r} in the logs within {timeout}s:\n{fleet.log_tail()}")


async def test_a_namespace_no_controller_serves_fails_at_once_and_names_it(
    ns: Namespace, other_ns: Namespace, fleet: Fleet
) -> None:
    # A fleet runs in the test's namespace; the user's flag points at another one.
    model = ns.model("echo")
    fleet.controller()
    fleet.worker(model, handler="modelfleet.handlers:echo")
    await fleet.wait_routable(model, workers=1)

    started = time.monotonic()
    wrong = await _cli(
        fleet, "submit", "--namespace", other_ns.name, "--model", model, "--timeout", "60", "{}"
    )
    elapsed = time.monotonic() - started
    assert wrong.returncode == 1, wrong.stderr
    error = parse_json_line(wrong.stderr)
    assert error["error"] == "NO_WORKER" and error["code"] == 50005
    assert f"namespace {other_ns.name!r}" in error["message"], error
    assert "no controller" in error["message"]
    # Before: the whole 60 s deadline, then WORKER_TIMEOUT. A process start is most of this.
    assert elapsed < 10, f"took {elapsed:.1f}s"

    # The same command in the right namespace (the environment's, the flag absent) is answered.
    right = await _cli(fleet, "submit", "--model", model, '{"ok": 1}')
    assert right.returncode == 0 and json.loads(right.stdout) == {"ok": 1}, right.stderr


async def test_a_worker_without_a_controller_says_why_in_its_log(
    ns: Namespace, fleet: Fleet
) -> None:
    model = ns.model()
    fleet.worker(model, handler="modelfleet.handlers:echo")
    log = await _wait_for_log("worker-*.log", fleet, "no controller serves namespace")
    assert f"'{ns.name}'" in log and model in log and "modelfleet controller" in log

    fleet.controller()
    await fleet.wait_routable(model, workers=1)
    await _wait_for_log("worker-*.log", fleet, f"a controller serves namespace {ns.name} now")


async def test_status_names_the_namespace_and_the_controller(
    ns: Namespace, other_ns: Namespace, fleet: Fleet
) -> None:
    model = ns.model()
    fleet.controller()
    fleet.worker(model)
    await fleet.wait_routable(model, workers=1)
    await fleet.wait("/healthz", lambda h: h["healthy"], what="a healthy controller")

    table = await _cli(fleet, "status")
    assert table.returncode == 0, table.stderr
    first = table.stdout.splitlines()[0]
    assert f"namespace {ns.name}" in first and fleet.status_url in first and "healthy" in first

    as_json = json.loads((await _cli(fleet, "status", "--json")).stdout)
    assert as_json["namespace"] == ns.name and as_json["controller"]["url"] == fleet.status_url
    assert as_json["namespace_matches"] is True

    # Asked about another namespace, status says the controller it reads serves another one.
    other = await _cli(fleet, "status", "--namespace", other_ns.name)
    assert f"serves namespace {ns.name!r}, not {other_ns.name!r}" in other.stdout
    other_json = await _cli(fleet, "status", "--json", "--namespace", other_ns.name)
    assert json.loads(other_json.stdout)["namespace_matches"] is False


async def test_a_handler_file_in_the_current_directory_is_found(
    ns: Namespace, fleet: Fleet, tmp_path: Path
) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "myhandlers.py").write_text(
        "async def shout(job):\n    return {'up': job.payload['text'].upper()}\n"
    )
    model = ns.model()
    fleet.controller()
    fleet.spawn("worker", "worker", "--model", model, "--handler", "myhandlers:shout", cwd=folder)
    await fleet.wait_routable(model, workers=1)
    done = await _cli(fleet, "submit", "--model", model, '{"text": "hi"}')
    assert done.returncode == 0 and json.loads(done.stdout) == {"up": "HI"}, done.stderr

    missing = await _cli(fleet, "worker", "--model", model, "--handler", "nosuchmodule:f")
    assert missing.returncode == 2
    error = parse_json_line(missing.stderr)
    assert error["error"] == "USAGE" and "current directory" in error["message"]
    assert "PYTHONPATH" in error["message"]


def test_a_missing_payload_is_a_usage_error(ns: Namespace, tmp_path: Path) -> None:
    done = Fleet(ns, tmp_path).run_cli("submit", "--model", "m")
    assert done.returncode == 2
    error = parse_json_line(done.stderr)
    assert error["error"] == "USAGE" and "PAYLOAD_JSON" in error["message"]


def test_amqp_url_flag_wins_and_an_unreachable_broker_is_one_line(
    ns: Namespace, tmp_path: Path
) -> None:
    fleet = Fleet(ns, tmp_path)
    done = fleet.run_cli(
        "submit", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/", "--model", "m", "{}"
    )
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # no library log line before ours
    error = json.loads(lines[0])
    assert error["error"] == "BROKER_ERROR" and "127.0.0.1:1" in error["message"]


def _on_a_terminal(ns: Namespace, *args: str) -> tuple[int, str]:
    """Run a command with stderr on a pseudo-terminal, as a person at a shell does."""
    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "modelfleet", *args],
            env={**os.environ, **ns.env()},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=follower,
            timeout=30,
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_failures_read_as_a_sentence_on_a_terminal_and_as_json_when_asked(
    ns: Namespace,
) -> None:
    code, text = _on_a_terminal(ns, "submit", "--model", "ghost", "{}")
    assert code == 1
    line = text.strip().splitlines()[-1]
    assert line.startswith("modelfleet: NO_WORKER: no controller serves namespace"), text
    assert line.endswith(")") and "model ghost" in line

    code, text = _on_a_terminal(ns, "--json", "submit", "--model", "ghost", "{}")
    assert code == 1
    assert json.loads(text.strip().splitlines()[-1])["error"] == "NO_WORKER"

    code, text = _on_a_terminal(ns, "submit", "--model", "m")
    assert code == 2 and "usage: modelfleet submit" in text
    assert "modelfleet: USAGE: " in text


def test_a_controller_on_a_busy_port_says_so_in_one_line(ns: Namespace, tmp_path: Path) -> None:
    import socket

    fleet = Fleet(ns, tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = fleet.run_cli("controller", "--port", str(port))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    error = json.loads(lines[0])
    assert error["error"] == "CONFIG_ERROR" and str(port) in error["message"]
    assert "--port" in error["message"]
