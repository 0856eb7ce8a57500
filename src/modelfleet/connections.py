"""Opening RabbitMQ connections the same way everywhere: robust, short AMQP heartbeat, bounded.

**Every place modelfleet goes below aio-pika's public API**, why, and the test that covers its
failure modes (tests/...; ``::`` names the test). The versions these rely on are pinned in
pyproject.toml (aio-pika >= 10.2.1, < 11; aiormq >= 7.2.4, < 8).

Speed (bench/README.md has the figures):

* :mod:`modelfleet.coalesce` — aiormq's ``TransportFactory`` hook, handed over by a
  ``RobustConnection`` subclass (aio-pika does not forward it): one socket write per run of loop
  turns — ``unit/test_coalesce.py``, ``integration/test_coalesce.py`` (order, confirms, the
  setting turns it off).
* :func:`modelfleet.publishing.publish_on` — aiormq ``basic_publish(wait=False)`` with pamqp
  properties, on a given aiormq channel (jobs on the client's armed channel, replies on the
  delivery's own): no drain wait under the channel lock, and a reply dies with its delivery —
  ``integration/test_client_recovery.py``,
  ``integration/test_worker_recovery.py::test_a_stream_whose_channel_dies_is_redelivered_not_failed``.
* ``Client._arm`` — the direct reply-to consumer on the aiormq channel (no aio-pika message
  wrapper per reply), re-armed after every channel reopen or reconnection —
  ``integration/test_client_recovery.py::test_any_error_that_closes_the_clients_channel_is_recovered``,
  ``integration/test_connection_loss.py``.
* ``Controller`` heartbeat consumer — a raw aiormq consumer (the hot path of a large fleet),
  re-armed from the underlay channel's ``on_consumer_cancel_callbacks`` and the robust channel's
  ``reopen_callbacks`` — ``integration/test_controller_recovery.py`` (heartbeat queue deleted,
  channel error, silent connection).
* :mod:`modelfleet.acks` — aiormq ``basic_ack/nack/reject(wait=False)``: batched acks, a call
  that returns has queued its frame, so no multiple ack overtakes a nack —
  ``integration/test_acks.py::test_a_multiple_ack_never_overtakes_a_nack``,
  ``::test_a_nack_cancelled_before_its_frame_is_queued_leaves_the_job_unsettled``.

Correctness (aio-pika or aiormq would otherwise get it wrong):

* :func:`modelfleet.publishing.closing` and :func:`~modelfleet.publishing.guard_channel` —
  read aiormq ``Channel._close_exception`` and wrap its ``write_queue``: no frame of a channel
  follows its CloseOk, which would make the broker close the whole connection —
  ``integration/test_client_faults.py::test_a_channel_error_under_load_never_closes_the_connection``.
* :meth:`modelfleet.topology.Topology.queue_counts` — aiormq ``queue_declare(passive=True)``: a
  robust channel answers a passive declare from its cache, which froze queue depths —
  ``integration/test_controller_recovery.py::test_queue_depth_follows_the_broker_as_the_queue_drains``.
* "Connected" — aio-pika's ``Connection.connected`` event and the aiormq transport, since
  ``is_closed`` stays False while a robust connection reconnects (controller loops, worker
  consumer watch) — ``integration/test_controller_recovery.py::``
  ``test_a_silent_connection_dropped_by_aiormq_leaves_every_loop_running``,
  ``process/test_controller_process_recovery.py``,
  ``integration/test_worker_races.py::test_a_network_outage_is_no_reason_to_give_up``.
* ``Client._watch_channel`` — ``RobustChannel.reopen()`` when aio-pika's own restore failed and
  left the channel closed with the connection up (it only logs that) —
  ``integration/test_client_faults.py::test_a_channel_left_closed_with_the_connection_up_is_reopened``.
* ``Controller._discard`` — closes an abandoned robust channel again from its
  ``reopen_callbacks`` when aio-pika's restore reopens it (else one channel leaks per refused
  set-up) — ``integration/test_controller_recovery.py::``
  ``test_a_base_topology_that_cannot_be_declared_does_not_leak_channels``.
* Worker consumer watch — aiormq ``Channel.consumers`` tells a consumer the broker cancelled;
  plain ``aio_pika.Channel(connection)`` + ``initialize()`` for heartbeat and probe channels
  (no cached passive declare, no restore waiting on a missing exchange) —
  ``integration/test_worker_recovery.py``, ``integration/test_worker_races.py``.
* Worker and controller rely on aiormq 7 cancelling a channel's consumer tasks when it closes
  (a delivery's handler task then ends without settling anything) —
  ``integration/test_worker_recovery.py::test_a_channel_error_on_the_job_channel_does_not_stop_the_worker``.

Readable failures:

* :func:`connect_failure` (every connect here) — RabbitMQ answers ``Connection.Open`` of a
  missing virtual host, or one the user may not use, with ``Connection.Close`` (530
  NOT_ALLOWED); aiormq 7 raises ``InvalidFrameError`` naming only that frame's ``repr``. Its
  reply code and text are read from the local ``frame`` of aiormq's ``Connection._rpc``, which
  the exception's traceback keeps; without it (another aiormq) the refused ``Connection.OpenOk``
  named in the message still tells the case, only the broker's own words are missing —
  ``integration/test_connect_errors.py`` (a missing vhost, a user without permissions, a vhost
  at its connection limit, a wrong password, through both connects and the command line; the
  fallback without the frame).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import socket
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractRobustConnection

from modelfleet.coalesce import CoalescingRobustConnection
from modelfleet.config import AmqpSettings
from modelfleet.errors import BrokerError, ConfigError
from modelfleet.security import ssl_context

__all__ = ["connect", "connect_failure", "connect_plain", "redact", "refusal_reason"]

log = logging.getLogger(__name__)


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


# RabbitMQ's reply codes for a connection it refuses while opening.
ACCESS_REFUSED = 403  # a bad login (aiormq: ProbableAuthenticationError)
NOT_ALLOWED = 530  # Connection.Open refused: no such vhost, no permission on it, a limit
# How aiormq 7 words a Connection.Close sent in answer to Connection.Open.
_OPEN_REFUSED = "Expected one of ['Connection.OpenOk'], got <Connection.Close"


def refusal_reason(code: int | None, text: str | None, *, vhost: str, user: str) -> str:
    """Why RabbitMQ refused a new connection, saying what to check: from the reply code and
    text of the ``Connection.Close`` it answered with (``text`` None when unknown). For 530
    NOT_ALLOWED, say: ``virtual host 'novhost' does not exist or user 'guest' may not use it
    (rabbitmqctl list_permissions -p novhost); RabbitMQ said: NOT_ALLOWED - vhost novhost not
    found``.
    """
    said = f"; RabbitMQ said: {' '.join(text.split())}" if text else ""
    if code == NOT_ALLOWED:
        if text and "limit" in text.lower():
            return f"RabbitMQ refused user {user!r} on virtual host {vhost!r}{said}"
        return (
            f"virtual host {vhost!r} does not exist or user {user!r} may not use it "
            f"(rabbitmqctl list_permissions -p {shlex.quote(vhost)}){said}"
        )
    if code == ACCESS_REFUSED:
        return (
            f"user {user!r} could not log in: wrong password, no such user, or a user that may "
            f"log in from localhost only (as guest by default){said}"
        )
    shown = f" ({code})" if code is not None else ""
    return f"RabbitMQ closed the connection{shown}{said}"


def _close_frame(exc: BaseException) -> aiormq.spec.Connection.Close | None:
    """The ``Connection.Close`` behind an aiormq ``InvalidFrameError``: the local ``frame`` of
    ``Connection._rpc`` where it was raised, kept by the traceback (see the module doc)."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame.f_locals.get("frame")
        if isinstance(frame, aiormq.spec.Connection.Close):
            return frame
        tb = tb.tb_next
    return None


def connect_failure(exc: BaseException, url: str) -> str:
    """What went wrong connecting to ``url``, in one line: a refusal by RabbitMQ in words that
    say what to check (:func:`refusal_reason`), anything else as the exception says it."""
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    user = unquote(parts.username) if parts.username else "guest"
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else None
        return refusal_reason(ACCESS_REFUSED, text, vhost=vhost, user=user)
    if isinstance(exc, aiormq.exceptions.InvalidFrameError):
        close = _close_frame(exc)
        if close is not None:
            return refusal_reason(close.reply_code, close.reply_text, vhost=vhost, user=user)
        if _OPEN_REFUSED in str(exc):
            return refusal_reason(NOT_ALLOWED, None, vhost=vhost, user=user)
    return " ".join((str(exc) or type(exc).__name__).split())


def _with_params(url: str, amqp: AmqpSettings, name: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    # The URL's own query wins: an operator who wrote ?heartbeat=30 meant it.
    query.setdefault("heartbeat", str(amqp.heartbeat_s))
    query.setdefault("reconnect_interval", str(amqp.reconnect_interval_s))
    query.setdefault("name", name)
    return urlunsplit(parts._replace(query=urlencode(query)))


async def connect(
    amqp: AmqpSettings, *, role: str, url: str | None = None
) -> AbstractRobustConnection:
    """A robust connection (re-connects, re-declares, re-consumes) named for its role.

    Raises :class:`BrokerError` if the first connection cannot be made within
    ``amqp.connect_timeout_s``.
    """
    target = url or amqp.url
    name = f"modelfleet-{role}@{socket.gethostname()}:{os.getpid()}"
    try:
        # amqps://: TLS with amqp.ca_file / cert_file / key_file (modelfleet.security).
        context = ssl_context(amqp, target)
        # coalesce_writes: one socket write per event loop turn (modelfleet.coalesce).
        kind = CoalescingRobustConnection if amqp.coalesce_writes else aio_pika.RobustConnection
        return await asyncio.wait_for(
            aio_pika.connect_robust(
                _with_params(target, amqp, name), ssl_context=context, connection_class=kind
            ),
            timeout=amqp.connect_timeout_s,
        )
    except (TimeoutError, OSError, aio_pika.exceptions.AMQPError, ConfigError) as exc:
        reason = connect_failure(exc, target)
        raise BrokerError(f"cannot connect to RabbitMQ at {redact(target)}: {reason}") from exc


async def connect_plain(amqp: AmqpSettings, *, role: str) -> AbstractConnection:
    """A plain (not robust) connection, same parameters and TLS: for short command-line tools,
    where a lost connection should end the command (and the broker then requeues whatever it
    had delivered) rather than be silently resumed."""
    name = f"modelfleet-{role}@{socket.gethostname()}:{os.getpid()}"
    try:
        context = ssl_context(amqp, amqp.url)
        return await asyncio.wait_for(
            aio_pika.connect(_with_params(amqp.url, amqp, name), ssl_context=context),
            timeout=amqp.connect_timeout_s,
        )
    except (TimeoutError, OSError, aio_pika.exceptions.AMQPError, ConfigError) as exc:
        reason = connect_failure(exc, amqp.url)
        raise BrokerError(f"cannot connect to RabbitMQ at {redact(amqp.url)}: {reason}") from exc
