"""``modelfleet permissions``: least-privilege RabbitMQ users for one namespace.

Three users, ``{prefix}-controller``, ``{prefix}-worker`` and ``{prefix}-producer`` (the prefix
defaults to the namespace), each with ``rabbitmqctl set_permissions`` regular expressions that
allow only its part. RabbitMQ matches each expression against the name of the exchange or queue
an operation touches (``configure`` = declare/delete, ``write`` = publish/bind a queue,
``read`` = consume/get, bind from an exchange); the default exchange is ``amq.default``.

* controller: configure ``^NS\\.``, write ``^(NS\\..*|amq\\.default)$``, read ``^NS\\.``
* worker: configure ``^NS\\.(model|control)\\.``,
  write ``^(NS\\.heartbeats|NS\\.dead|NS\\.control\\..*|amq\\.default)$``,
  read ``^NS\\.(model\\..+|control|control\\..+)$`` (not ``NS.controller.<id>``)
* producer: configure ``^$`` (nothing), write ``^NS\\.(jobs|control)$``, read ``^$`` (nothing)

* The **controller** does everything in the namespace: declares it, binds and unbinds model
  queues, consumes heartbeats and the unroutable queue, answers NO_WORKER over the default
  exchange. Use it for ``modelfleet errors`` too.
* A **worker** declares and consumes model queues, publishes heartbeats and dead-letter copies,
  and replies through the default exchange. It cannot bind a queue to ``NS.jobs`` (no write on
  any queue, no read on the jobs exchange), so it cannot route jobs to itself, and it cannot
  declare or delete the exchanges. Note: write on ``amq.default`` (needed for direct reply-to)
  lets it publish into any queue of the vhost by name; RabbitMQ 3.10 has no finer grain for the
  default exchange. Give each namespace its own vhost to contain that.
* A **producer** only publishes to ``NS.jobs`` and reads its replies: consuming
  ``amq.rabbitmq.reply-to`` needs no permission. It cannot publish heartbeats (so cannot
  announce workers), consume model queues, or declare anything; ``modelfleet.Client`` then only
  checks that the jobs exchange exists (the controller declares it).

Passwords come from ``MODELFLEET_PASSWORD_CONTROLLER``, ``MODELFLEET_PASSWORD_WORKER`` and
``MODELFLEET_PASSWORD_PRODUCER``; a missing one is generated and printed once. ``--apply`` runs
the commands through ``rabbitmqctl``, handing passwords over stdin rather than the command line
(so they never show in ``ps``); a user that already exists gets the new password.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shlex
import string
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from modelfleet.config import Settings
from modelfleet.console import BROKER_ERROR, USAGE, report_error

__all__ = [
    "ROLES",
    "Password",
    "RoleGrant",
    "add_permissions_parser",
    "apply_grants",
    "grants",
    "passwords_for",
    "render_script",
    "run_permissions",
    "vhost_of",
]

ROLES = ("controller", "worker", "producer")
PASSWORD_ENV = "MODELFLEET_PASSWORD_{role}"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# RabbitMQ's default exchange, as permissions name it.
DEFAULT_EXCHANGE = "amq.default"
NOTHING = "^$"

_ROLE_TEXT = {
    "controller": "runs `modelfleet controller` (and `modelfleet errors`): all of the namespace",
    "worker": "consumes its model queues, publishes heartbeats and dead-letter copies, replies "
    "over the default exchange; cannot bind queues to the jobs exchange",
    "producer": "publishes jobs and reads their replies (direct reply-to); nothing else",
}


@dataclass(frozen=True)
class RoleGrant:
    """One user and its three permission regexes in a vhost."""

    role: str
    user: str
    configure: str
    write: str
    read: str


def grants(namespace: str, prefix: str | None = None) -> list[RoleGrant]:
    """The three users' permissions for ``namespace`` (regexes; dots escaped)."""
    ns = re.escape(namespace)
    default = re.escape(DEFAULT_EXCHANGE)
    prefix = prefix or namespace
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"prefix {prefix!r}: use letters, digits, '_', '-' or '.'")
    table = {
        "controller": (f"^{ns}\\.", f"^({ns}\\..*|{default})$", f"^{ns}\\."),
        # Workers also declare, bind and consume their own control queue `NS.control.<id>`
        # (cancel messages); binding needs write on that queue and read on `NS.control`.
        "worker": (
            f"^{ns}\\.(model|control)\\.",
            f"^({ns}\\.heartbeats|{ns}\\.dead|{ns}\\.control\\..*|{default})$",
            # Anchored at both ends: `NS.control` and `NS.control.<id>`, never
            # `NS.controller.<id>` (the controller's heartbeat queue; its id is public).
            f"^{ns}\\.(model\\..+|control|control\\..+)$",
        ),
        # Producers publish jobs, and cancel messages to `NS.control`.
        "producer": (NOTHING, f"^{ns}\\.(jobs|control)$", NOTHING),
    }
    return [RoleGrant(role, f"{prefix}-{role}", *table[role]) for role in ROLES]


@dataclass(frozen=True)
class Password:
    value: str
    env_var: str
    generated: bool


def passwords_for(
    environ: Mapping[str, str] | None = None, *, generate: Callable[[], str] | None = None
) -> dict[str, Password]:
    """Each role's password: ``MODELFLEET_PASSWORD_<ROLE>``, else a new random one."""
    environ = os.environ if environ is None else environ
    make = generate or _new_password
    out: dict[str, Password] = {}
    for role in ROLES:
        var = PASSWORD_ENV.format(role=role.upper())
        given = environ.get(var)
        out[role] = Password(given, var, False) if given else Password(make(), var, True)
    return out


def _new_password() -> str:
    # Letters and digits only: nothing a shell, a URL or rabbitmqctl's option parser (a leading
    # "-") could misread.
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(32))


def vhost_of(url: str) -> str:
    """The vhost an AMQP URL names (``/`` when it names none), as aio-pika reads it."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _example_url(url: str, user: str, vhost: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:PASSWORD@{host}" + (f":{parts.port}" if parts.port else "")
    path = "/" if vhost == "/" else "/" + vhost.replace("/", "%2F")
    return urlunsplit((parts.scheme, netloc, path, "", ""))


def render_script(
    plan: Sequence[RoleGrant],
    passwords: Mapping[str, Password],
    *,
    vhost: str,
    namespace: str,
    url: str,
    rabbitmqctl: str = "rabbitmqctl",
) -> str:
    """The shell commands creating the users (generated passwords appear here, once)."""
    q = shlex.quote
    lines = [
        f"# modelfleet least-privilege users for namespace {namespace!r} in vhost {vhost!r}",
        *(f"# {g.user}: {_ROLE_TEXT[g.role]}" for g in plan),
        "# (add_user fails for an existing user: use change_password for it instead)",
    ]
    for g in plan:
        password = passwords[g.role]
        if password.generated:
            lines.append(f"# generated password for {g.user} (shown once; store it now)")
            secret = q(password.value)
        else:
            secret = f'"${password.env_var}"'
        lines += [
            f"{rabbitmqctl} add_user {q(g.user)} {secret}",
            f"{rabbitmqctl} set_permissions -p {q(vhost)} {q(g.user)} "
            f"{q(g.configure)} {q(g.write)} {q(g.read)}",
        ]
    worker = next(g.user for g in plan if g.role == "worker")
    lines += [
        "# Then give each process its own user, e.g. for workers:",
        f"#   MODELFLEET_AMQP__URL={_example_url(url, worker, vhost)}",
        "# and make controllers believe heartbeats from workers only (settings.toml):",
        f'#   [security]\n#   heartbeat_users = ["{worker}"]',
    ]
    return "\n".join(lines)


class ApplyError(Exception):
    """A rabbitmqctl step failed; the message holds its output."""


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def apply_grants(
    plan: Sequence[RoleGrant],
    passwords: Mapping[str, Password],
    *,
    vhost: str,
    rabbitmqctl: Sequence[str] = ("rabbitmqctl",),
    run: Runner = subprocess.run,
    echo: Callable[[str], None] = print,
) -> None:
    """Create (or update) the users and set their permissions with ``rabbitmqctl``.

    Passwords go over stdin (``rabbitmqctl add_user USER`` reads it from there), never argv.
    Raises :class:`ApplyError` with rabbitmqctl's output when a step fails.
    """

    def call(args: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return run(
                [*rabbitmqctl, *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except FileNotFoundError:
            raise ApplyError(f"{rabbitmqctl[0]!r} not found: is RabbitMQ installed here?") from None
        except subprocess.TimeoutExpired:
            raise ApplyError(f"{' '.join(rabbitmqctl)} {args[0]} timed out") from None

    def output(result: subprocess.CompletedProcess[str]) -> str:
        return " ".join((result.stderr + " " + result.stdout).split())

    for g in plan:
        secret = passwords[g.role].value + "\n"
        result = call(["add_user", g.user], secret)
        if result.returncode == 0:
            echo(f"created user {g.user}")
        elif "already exists" in result.stderr + result.stdout:
            changed = call(["change_password", g.user], secret)
            if changed.returncode != 0:
                raise ApplyError(f"change_password {g.user}: {output(changed)}")
            echo(f"user {g.user} existed: password updated")
        else:
            raise ApplyError(f"add_user {g.user}: {output(result)}")
        granted = call(["set_permissions", "-p", vhost, g.user, g.configure, g.write, g.read])
        if granted.returncode != 0:
            raise ApplyError(f"set_permissions {g.user}: {output(granted)}")
        echo(f"permissions of {g.user} in vhost {vhost}: {g.configure} {g.write} {g.read}")


# -- command line ----------------------------------------------------------------------------


def add_permissions_parser(
    commands: argparse._SubParsersAction[Any],
    common: argparse.ArgumentParser,
) -> None:
    """``modelfleet permissions`` (called by :mod:`modelfleet.cli`)."""
    parser = commands.add_parser(
        "permissions",
        parents=[common],
        help="print (or --apply) rabbitmqctl commands creating least-privilege users",
        description=(
            "Create {prefix}-controller, {prefix}-worker and {prefix}-producer with permissions "
            "that let each do only its part. Passwords: $MODELFLEET_PASSWORD_CONTROLLER, "
            "_WORKER, _PRODUCER, else generated and printed once."
        ),
    )
    parser.add_argument("--apply", action="store_true", help="run the commands now")
    parser.add_argument("--vhost", metavar="V", help="virtual host (default: amqp.url's)")
    parser.add_argument("--prefix", metavar="P", help="user name prefix (default: the namespace)")
    parser.add_argument(
        "--rabbitmqctl",
        default="rabbitmqctl",
        metavar="CMD",
        help="how to run rabbitmqctl (default: rabbitmqctl; e.g. "
        "'docker compose exec -T rabbitmq rabbitmqctl')",
    )


def run_permissions(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``modelfleet permissions``; returns the exit code."""
    try:
        plan = grants(settings.namespace, args.prefix)
    except ValueError as exc:
        report_error(USAGE, f"--prefix: {exc}", json_mode=getattr(args, "json", False))
        return 2
    vhost = args.vhost or vhost_of(settings.amqp.url)
    passwords = passwords_for()
    print(
        render_script(
            plan,
            passwords,
            vhost=vhost,
            namespace=settings.namespace,
            url=settings.amqp.url,
            rabbitmqctl=args.rabbitmqctl,
        ),
        flush=True,
    )
    if not args.apply:
        return 0
    try:
        apply_grants(
            plan,
            passwords,
            vhost=vhost,
            rabbitmqctl=shlex.split(args.rabbitmqctl),
            echo=lambda line: print(f"applied: {line}", flush=True),
        )
    except ApplyError as exc:
        report_error(
            BROKER_ERROR,
            f"permissions --apply failed: {exc}",
            json_mode=getattr(args, "json", False),
        )
        return 3
    return 0
