"""The ``modelfleet`` command, run as a user runs it."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import Namespace
from tests.process.conftest import Fleet, parse_json_line

pytestmark = pytest.mark.process


async def _cli(fleet: Fleet, *args: str, stdin: str | None = None):  # type: ignore[no-untyped-def]
    return await asyncio.to_thread(fleet.run_cli, *args, stdin=stdin)


async def test_submit_prints_result_and_stream(ns: Namespace, fleet: Fleet) -> None:
    echo, llm = ns.model("echo"), ns.model("llm")
    fleet.controller()
    fleet.worker(echo, handler="modelfleet.handlers:echo")
    fleet.worker(llm, handler="modelfleet.handlers:fake_llm")
    await fleet.wait_routable(echo, workers=1)
    await fleet.wait_routable(llm, workers=1)

    done = await _cli(fleet, "submit", "--model", echo, '{"x": [1, 2]}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"x": [1, 2]}

    from_stdin = await _cli(fleet, "submit", "--model", echo, "-", stdin='{"y": true}')
    assert from_stdin.returncode == 0 and json.loads(from_stdin.stdout) == {"y": True}

    streamed = await _cli(
        fleet, "submit", "--model", llm, "--stream", '{"prompt": "hello streaming world"}'
    )
    assert streamed.returncode == 0, streamed.stderr
    lines = [json.loads(line) for line in streamed.stdout.splitlines()]
    # Each chunk is marked as one, and the final result as the result.
    assert lines[:-1] == [
        {"chunk": {"text": "hello"}},
        {"chunk": {"text": " streaming"}},
        {"chunk": {"text": " world"}},
    ]
    assert lines[-1] == {"result": {"text": "hello streaming world", "words": 3}}


async def test_submit_errors_exit_nonzero_with_json_code(ns: Namespace, fleet: Fleet) -> None:
    llm = ns.model("llm")
    fleet.controller()
    fleet.worker(llm, handler="modelfleet.handlers:fake_llm")
    await fleet.wait_routable(llm, workers=1)

    nobody = await _cli(
        fleet, "submit", "--model", ns.model("ghost"), "--timeout", "10", '{"prompt": "x"}'
    )
    assert nobody.returncode == 1
    error = parse_json_line(nobody.stderr)
    assert error["code"] == 50005 and error["error"] == "NO_WORKER" and error["job_id"]

    invalid = await _cli(fleet, "submit", "--model", llm, '{"no_prompt": 1}')
    assert invalid.returncode == 1
    assert parse_json_line(invalid.stderr)["code"] == 40001

    hostile = await _cli(fleet, "submit", "--model", "bad#name", "{}")
    assert hostile.returncode == 1
    assert parse_json_line(hostile.stderr)["code"] == 40301

    not_json = await _cli(fleet, "submit", "--model", llm, "{nope")
    assert not_json.returncode == 2 and "not valid JSON" in not_json.stderr


async def test_status_table_and_json(ns: Namespace, fleet: Fleet) -> None:
    model = ns.model()
    fleet.controller()
    worker = fleet.worker(model, concurrency=3)
    await fleet.wait_routable(model, workers=1)

    table = await _cli(fleet, "status")
    assert table.returncode == 0, table.stderr
    assert "MODEL" in table.stdout and "WORKER" in table.stdout
    model_line = next(line for line in table.stdout.splitlines() if line.startswith(model))
    assert model_line.split()[1:3] == ["1", "3"] and model_line.split()[-1] == "yes"
    assert f":{worker.pid}" in table.stdout

    as_json = await _cli(fleet, "status", "--json")
    data = json.loads(as_json.stdout)
    assert data["models"][0]["name"] == model and data["workers"][0]["pid"] == worker.pid


def test_status_without_controller_says_so(ns: Namespace, tmp_path: Path) -> None:
    fleet = Fleet(ns, tmp_path)
    done = fleet.run_cli("status")
    assert done.returncode == 3
    assert "did not answer" in parse_json_line(done.stderr)["message"]


@pytest.mark.parametrize(
    "command", ["controller", "worker --model m", "submit --model m {}", "status", "demo"]
)
def test_every_command_takes_config_and_reports_bad_settings(
    ns: Namespace, tmp_path: Path, command: str
) -> None:
    fleet = Fleet(ns, tmp_path)
    missing = fleet.run_cli(*command.split(), "--config", str(tmp_path / "missing.toml"))
    assert missing.returncode == 2
    assert "missing.toml" in missing.stderr and "does not exist" in missing.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text("[worker]\nconcurrency = 0\n")
    done = fleet.run_cli(*command.split(), "--config", str(bad))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "worker.concurrency" in lines[0], done.stderr


def test_bad_env_value_stops_at_start_with_one_line(ns: Namespace, tmp_path: Path) -> None:
    fleet = Fleet(ns, tmp_path)
    fleet.env["MODELFLEET_AMQP__URL"] = "http://not-amqp"
    done = fleet.run_cli("controller")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "amqp.url" in done.stderr


def test_worker_rejects_a_bad_handler(ns: Namespace, tmp_path: Path) -> None:
    fleet = Fleet(ns, tmp_path)
    done = fleet.run_cli("worker", "--model", "m", "--handler", "modelfleet.handlers:nope")
    assert done.returncode == 2 and "no attribute 'nope'" in done.stderr


def test_config_file_selects_namespace(ns: Namespace, tmp_path: Path) -> None:
    """A settings file given with --config is what the command uses (env still wins)."""
    config = tmp_path / "settings.toml"
    config.write_text(f'namespace = "{ns.name}"\n[client]\ntimeout_s = 3\n')
    fleet = Fleet(ns, tmp_path)
    del fleet.env["MODELFLEET_NAMESPACE"]
    done = fleet.run_cli("submit", "--config", str(config), "--model", ns.model("ghost"), "{}")
    # No controller runs in the file's namespace: the job fails at once, naming it.
    assert done.returncode == 1
    error = parse_json_line(done.stderr)
    assert error["code"] == 50005 and f"namespace {ns.name!r}" in error["message"]


def test_demo_runs_and_exits_zero(ns: Namespace, tmp_path: Path) -> None:
    fleet = Fleet(ns, tmp_path)
    done = fleet.run_cli("demo", "--jobs", "60", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo passed" in done.stdout
    assert "60/60 jobs answered" in done.stdout and "NO_WORKER (50005)" in done.stdout


def test_python_dash_m_version() -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "modelfleet", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("modelfleet ")
