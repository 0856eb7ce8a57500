"""A connection RabbitMQ refuses says why in one line: a virtual host that does not exist or
that the user may not use, a wrong password. Against the real broker, through both connects and
the command line; the words themselves (:func:`refusal_reason`) and the fallback when aiormq
does not hand over the broker's ``Connection.Close`` (:func:`connect_failure`) without one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import aiormq
import pytest
from aio_pika.abc import AbstractConnection

from modelfleet.config import AmqpSettings
from modelfleet.connections import connect, connect_failure, connect_plain, refusal_reason
from modelfleet.errors import BrokerError

# What aiormq 7 raises when RabbitMQ answers Connection.Open with Connection.Close.
OPEN_REFUSED = "Expected one of ['Connection.OpenOk'], got <Connection.Close object at 0x7f00>"


def with_login(url: str, *, user: str, password: str, vhost: str) -> str:
    """``url`` (the test broker) with other credentials and virtual host."""
    parts = urlsplit(url)
    host = f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, "/" + quote(vhost, safe=""), "", ""))


def guest_url(amqp_url: str, *, password: str = "guest", vhost: str = "") -> str:
    parts = urlsplit(amqp_url)
    return with_login(amqp_url, user=parts.username or "guest", password=password, vhost=vhost)


async def broker_error(url: str, *, robust: bool) -> str:
    amqp = AmqpSettings(url=url, connect_timeout_s=15)
    connection: AbstractConnection
    with pytest.raises(BrokerError) as info:
        if robust:
            connection = await connect(amqp, role="test")
        else:
            connection = await connect_plain(amqp, role="test")
        await connection.close()  # not reached unless the broker let us in: the test fails
    return str(info.value)


def missing_vhost() -> str:
    return f"mft-novhost-{uuid.uuid4().hex[:8]}"


# --- against the broker -------------------------------------------------------------------------


@pytest.mark.parametrize("robust", [True, False], ids=["connect", "connect_plain"])
async def test_a_missing_vhost_is_named_with_what_to_check(amqp_url: str, robust: bool) -> None:
    vhost = missing_vhost()
    url = guest_url(amqp_url, vhost=vhost)
    message = await broker_error(url, robust=robust)
    user = urlsplit(amqp_url).username or "guest"
    assert message.startswith(f"cannot connect to RabbitMQ at {url.replace(':guest@', ':***@')}: ")
    assert (
        f"virtual host {vhost!r} does not exist or user {user!r} may not use it "
        f"(rabbitmqctl list_permissions -p {vhost}); RabbitMQ said: NOT_ALLOWED - "
    ) in message
    assert "object at 0x" not in message and "Expected one of" not in message
    assert "\n" not in message


def rabbitmqctl(*args: str) -> None:
    command = shutil.which("rabbitmqctl")
    assert command, "rabbitmqctl is needed to add a user or a vhost for this test"
    subprocess.run([command, *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def user_without_permissions() -> Iterator[tuple[str, str]]:
    """A RabbitMQ user with a password and no permission on any virtual host (deleted after)."""
    name, password = f"mft-noperm-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rabbitmqctl("add_user", name, password)
    try:
        yield name, password
    finally:
        rabbitmqctl("delete_user", name)


@pytest.fixture
def full_vhost() -> Iterator[str]:
    """A virtual host guest may use, that takes no connection (deleted after)."""
    name = f"mft-full-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        rabbitmqctl("set_vhost_limits", "-p", name, '{"max-connections": 0}')
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


async def test_a_user_without_permission_on_the_vhost_is_told_so(
    amqp_url: str, user_without_permissions: tuple[str, str]
) -> None:
    user, password = user_without_permissions
    url = with_login(amqp_url, user=user, password=password, vhost="/")
    message = await broker_error(url, robust=False)
    assert (
        f"virtual host '/' does not exist or user {user!r} may not use it "
        "(rabbitmqctl list_permissions -p /); RabbitMQ said: NOT_ALLOWED - access to vhost '/' "
        f"refused for user '{user}'"
    ) in message
    assert password not in message and "\n" not in message


async def test_a_vhost_at_its_connection_limit_is_not_called_missing(
    amqp_url: str, full_vhost: str
) -> None:
    message = await broker_error(guest_url(amqp_url, vhost=full_vhost), robust=True)
    assert f"RabbitMQ refused user 'guest' on virtual host {full_vhost!r}" in message
    assert "connection limit (0) is reached" in message
    assert "does not exist" not in message and "\n" not in message


@pytest.mark.parametrize("robust", [True, False], ids=["connect", "connect_plain"])
async def test_a_wrong_password_is_one_clear_line(amqp_url: str, robust: bool) -> None:
    url = guest_url(amqp_url, password="not-the-password")
    message = await broker_error(url, robust=robust)
    user = urlsplit(amqp_url).username or "guest"
    assert f"user {user!r} could not log in: wrong password, no such user" in message
    assert "RabbitMQ said: ACCESS_REFUSED - Login was refused" in message
    assert "not-the-password" not in message and "\n" not in message


def test_the_command_line_names_the_vhost_in_one_line(amqp_url: str) -> None:
    vhost = missing_vhost()
    url = guest_url(amqp_url, vhost=vhost)
    command = [sys.executable, "-m", "modelfleet", "submit", "--amqp-url", url, "--model", "m"]
    done = subprocess.run([*command, "{}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr  # stderr is no terminal: one JSON object
    failure = json.loads(lines[0])
    assert failure["error"] == "BROKER_ERROR"
    assert f"virtual host {vhost!r} does not exist" in failure["message"]
    assert f"rabbitmqctl list_permissions -p {vhost}" in failure["message"]
    assert "object at 0x" not in done.stderr


def test_errors_list_says_the_same_about_a_wrong_password(amqp_url: str) -> None:
    url = guest_url(amqp_url, password="not-the-password")
    command = [sys.executable, "-m", "modelfleet", "errors", "list", "--amqp-url", url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    failure = json.loads(lines[0])
    assert failure["error"] == "BROKER_ERROR"
    assert "could not log in: wrong password" in failure["message"]
    assert "not-the-password" not in done.stderr


# --- the words, no broker -----------------------------------------------------------------------


def test_a_refused_open_names_the_vhost_the_user_and_the_broker_words() -> None:
    text = "NOT_ALLOWED - vhost novhost not found"
    assert refusal_reason(530, text, vhost="novhost", user="guest") == (
        "virtual host 'novhost' does not exist or user 'guest' may not use it "
        "(rabbitmqctl list_permissions -p novhost); RabbitMQ said: NOT_ALLOWED - vhost novhost "
        "not found"
    )
    # Without the broker's words: the same advice.
    assert refusal_reason(530, None, vhost="a b", user="ann") == (
        "virtual host 'a b' does not exist or user 'ann' may not use it "
        "(rabbitmqctl list_permissions -p 'a b')"
    )


def test_a_connection_limit_is_not_mistaken_for_a_missing_vhost() -> None:
    text = "NOT_ALLOWED - access to vhost 'v' refused for user 'u': connection limit (0) is reached"
    reason = refusal_reason(530, text, vhost="v", user="u")
    assert "does not exist" not in reason
    assert reason == f"RabbitMQ refused user 'u' on virtual host 'v'; RabbitMQ said: {text}"


def test_a_refused_login_and_other_codes() -> None:
    reason = refusal_reason(403, "ACCESS_REFUSED - Login was refused", vhost="/", user="ann")
    assert reason.startswith("user 'ann' could not log in: wrong password, no such user")
    assert reason.endswith("; RabbitMQ said: ACCESS_REFUSED - Login was refused")
    assert refusal_reason(541, "INTERNAL_ERROR", vhost="/", user="ann") == (
        "RabbitMQ closed the connection (541); RabbitMQ said: INTERNAL_ERROR"
    )


def test_without_the_close_frame_the_message_still_names_the_vhost() -> None:
    # Raised here, not by aiormq: no Connection.Close in its traceback, only its repr.
    exc = aiormq.exceptions.InvalidFrameError(OPEN_REFUSED)
    reason = connect_failure(exc, "amqp://bob:secret@host:5672/tenant%2Fa")
    assert reason == (
        "virtual host 'tenant/a' does not exist or user 'bob' may not use it "
        "(rabbitmqctl list_permissions -p tenant/a)"
    )
    # The default vhost and user when the URL names none.
    assert "virtual host '/' does not exist or user 'guest'" in connect_failure(exc, "amqp://host/")


def test_other_failures_read_as_they_are() -> None:
    assert connect_failure(ConnectionRefusedError(111, "Connect call failed"), "amqp://h/") == (
        "[Errno 111] Connect call failed"
    )
    assert connect_failure(TimeoutError(), "amqp://h/") == "TimeoutError"
    auth = aiormq.exceptions.ProbableAuthenticationError("ACCESS_REFUSED - Login was refused")
    assert connect_failure(auth, "amqp://ann:pw@h/").startswith("user 'ann' could not log in")
