"""``modelfleet permissions`` without a broker: the regexes, passwords, the printed script, and
the rabbitmqctl calls --apply makes (with a recording runner; the real thing runs against the
local broker in tests/integration/test_security.py)."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest

from modelfleet.permissions import (
    ApplyError,
    Password,
    apply_grants,
    grants,
    passwords_for,
    render_script,
    vhost_of,
)
from modelfleet.topology import Names


def _allowed(regex: str, name: str) -> bool:
    # RabbitMQ runs the expression unanchored (re:run), like re.search.
    return re.search(regex, name) is not None


def test_three_users_named_after_the_prefix() -> None:
    plan = grants("prod", "fleet")
    assert [g.user for g in plan] == ["fleet-controller", "fleet-worker", "fleet-producer"]
    assert [g.user for g in grants("prod")] == ["prod-controller", "prod-worker", "prod-producer"]


def test_bad_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix"):
        grants("prod", "bad prefix")


def test_dots_are_escaped() -> None:
    # Unescaped, "prod.jobs" would also match "prodXjobs".
    producer = grants("prod")[2]
    assert producer.write == r"^prod\.(jobs|control)$"
    assert not _allowed(producer.write, "prodXjobs")


def test_regexes_allow_each_role_only_its_part() -> None:
    n = Names("prod")
    controller, worker, producer = grants("prod")
    model_queue = n.model_queue("meta-llama/Llama-3.1-8B")

    # The controller: everything in the namespace, nothing outside it.
    for name in (n.jobs, n.heartbeats, n.dead, n.errors, model_queue, n.controller_queue("c1")):
        assert _allowed(controller.configure, name)
        assert _allowed(controller.write, name)
        assert _allowed(controller.read, name)
    assert _allowed(controller.write, "amq.default")  # NO_WORKER replies
    for other in ("other.jobs", "prodx.jobs", "amq.topic"):
        assert not _allowed(controller.configure, other)
        assert not _allowed(controller.read, other)

    # A worker: declares and consumes model queues, publishes heartbeats, dead copies, replies.
    assert _allowed(worker.configure, model_queue)
    assert _allowed(worker.read, model_queue)
    for name in (n.heartbeats, n.dead, "amq.default"):
        assert _allowed(worker.write, name)
    # ... but may not bind (write on a queue + read on the exchange), publish jobs, or
    # declare/delete the namespace's exchanges.
    assert not _allowed(worker.write, model_queue)
    assert not _allowed(worker.read, n.jobs)
    assert not _allowed(worker.write, n.jobs)
    for name in (n.jobs, n.heartbeats, n.dead, n.errors, n.unroutable):
        assert not _allowed(worker.configure, name)

    # ... and its own control queue (cancel messages), bound to the control exchange.
    assert _allowed(worker.configure, n.control_queue("w1"))
    assert _allowed(worker.write, n.control_queue("w1"))
    assert _allowed(worker.read, n.control_queue("w1"))
    assert _allowed(worker.read, n.control)
    # ... but nothing else of the namespace: not the controller's own queues (whose id is
    # public on /healthz), nor the error, unroutable or catalog queues.
    for name in (
        n.controller_queue("c1"),
        n.dead_tap("c1"),
        n.errors,
        n.unroutable,
        n.catalog,
        "prod.controlX",
    ):
        assert not _allowed(worker.read, name), name

    # A producer: publishes jobs and cancels, nothing else (direct reply-to needs no permission).
    assert _allowed(producer.write, n.jobs)
    assert _allowed(producer.write, n.control)
    for name in (n.heartbeats, n.dead, "amq.default", model_queue):
        assert not _allowed(producer.write, name)
    for name in (n.jobs, model_queue, n.errors, "amq.rabbitmq.reply-to"):
        assert not _allowed(producer.configure, name)
        assert not _allowed(producer.read, name)


def test_passwords_from_env_or_generated() -> None:
    made = iter(["gen-1", "gen-2"])
    passwords = passwords_for(
        {"MODELFLEET_PASSWORD_WORKER": "from-env"}, generate=lambda: next(made)
    )
    assert passwords["worker"] == Password("from-env", "MODELFLEET_PASSWORD_WORKER", False)
    assert passwords["controller"] == Password("gen-1", "MODELFLEET_PASSWORD_CONTROLLER", True)
    assert passwords["producer"] == Password("gen-2", "MODELFLEET_PASSWORD_PRODUCER", True)


def test_generated_passwords_are_long_and_plain() -> None:
    passwords = passwords_for({})
    values = {p.value for p in passwords.values()}
    assert len(values) == 3
    for value in values:
        assert re.fullmatch(r"[A-Za-z0-9]{32}", value)


@pytest.mark.parametrize(
    ("url", "vhost"),
    [
        ("amqp://u:p@h:5672/", "/"),
        ("amqp://u:p@h:5672", "/"),
        ("amqp://u:p@h/prod", "prod"),
        ("amqp://u:p@h/%2Fteam", "/team"),
    ],
)
def test_vhost_of(url: str, vhost: str) -> None:
    assert vhost_of(url) == vhost


def test_script_shows_generated_passwords_once_and_env_ones_never() -> None:
    passwords = {
        "controller": Password("Gen3rated", "MODELFLEET_PASSWORD_CONTROLLER", True),
        "worker": Password("env-secret", "MODELFLEET_PASSWORD_WORKER", False),
        "producer": Password("Pr0ducer", "MODELFLEET_PASSWORD_PRODUCER", True),
    }
    script = render_script(
        grants("prod", "fleet"),
        passwords,
        vhost="/",
        namespace="prod",
        url="amqps://admin:x@rabbit.internal:5671/",
    )
    assert script.count("Gen3rated") == 1
    assert script.count("Pr0ducer") == 1
    assert "env-secret" not in script
    assert 'add_user fleet-worker "$MODELFLEET_PASSWORD_WORKER"' in script
    assert (
        "rabbitmqctl set_permissions -p / fleet-producer '^$' '^prod\\.(jobs|control)$' '^$'"
        in script
    )
    assert "amqps://fleet-worker:PASSWORD@rabbit.internal:5671/" in script
    assert 'heartbeat_users = ["fleet-worker"]' in script


class Recorder:
    """Stands in for subprocess.run: records each rabbitmqctl call and its stdin."""

    def __init__(self, existing: frozenset[str] = frozenset(), fail: str | None = None) -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.existing = set(existing)
        self.fail = fail

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        stdin = kwargs.get("input")
        self.calls.append((argv, stdin))
        action = argv[1]
        if action == self.fail:
            return subprocess.CompletedProcess(argv, 69, "", "Error: vhost nope does not exist")
        if action == "add_user" and argv[2] in self.existing:
            return subprocess.CompletedProcess(argv, 70, "", f'User "{argv[2]}" already exists')
        return subprocess.CompletedProcess(argv, 0, "Done.", "")


def _passwords() -> dict[str, Password]:
    return passwords_for({}, generate=iter(["pw-c", "pw-w", "pw-p"]).__next__)


def test_apply_sends_passwords_on_stdin_never_argv() -> None:
    run = Recorder()
    lines: list[str] = []
    apply_grants(grants("prod"), _passwords(), vhost="/", run=run, echo=lines.append)
    assert [argv[1:3] for argv, _ in run.calls] == [
        ["add_user", "prod-controller"],
        ["set_permissions", "-p"],
        ["add_user", "prod-worker"],
        ["set_permissions", "-p"],
        ["add_user", "prod-producer"],
        ["set_permissions", "-p"],
    ]
    assert [stdin for argv, stdin in run.calls if argv[1] == "add_user"] == [
        "pw-c\n",
        "pw-w\n",
        "pw-p\n",
    ]
    for argv, _ in run.calls:
        assert not any(pw in argv for pw in ("pw-c", "pw-w", "pw-p"))
    assert run.calls[-1][0] == [
        "rabbitmqctl",
        "set_permissions",
        "-p",
        "/",
        "prod-producer",
        "^$",
        r"^prod\.(jobs|control)$",
        "^$",
    ]
    assert lines[0] == "created user prod-controller"


def test_apply_updates_the_password_of_an_existing_user() -> None:
    run = Recorder(existing={"prod-worker"})
    lines: list[str] = []
    apply_grants(grants("prod"), _passwords(), vhost="/", run=run, echo=lines.append)
    assert (["rabbitmqctl", "change_password", "prod-worker"], "pw-w\n") in run.calls
    assert "user prod-worker existed: password updated" in lines


def test_apply_stops_at_the_first_failure_with_rabbitmqctls_words() -> None:
    run = Recorder(fail="set_permissions")
    with pytest.raises(ApplyError, match=r"set_permissions prod-controller: .*vhost nope"):
        apply_grants(grants("prod"), _passwords(), vhost="nope", run=run, echo=lambda _: None)
    assert len(run.calls) == 2


def test_apply_without_rabbitmqctl_says_so() -> None:
    with pytest.raises(ApplyError, match="not found"):
        apply_grants(
            grants("prod"),
            _passwords(),
            vhost="/",
            rabbitmqctl=["/nonexistent/rabbitmqctl"],
            echo=lambda _: None,
        )
