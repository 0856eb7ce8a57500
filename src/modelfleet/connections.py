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
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection

from modelfleet.coalesce import CoalescingRobustConnection
from modelfleet.config import AmqpSettings
from modelfleet.errors import BrokerError, ConfigError
from modelfleet.security import ssl_context

__all__ = ["connect", "connect_plain", "redact"]

log = logging.getLogger(__name__)


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


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
        reason = str(exc) or type(exc).__name__
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
        reason = str(exc) or type(exc).__name__
        raise BrokerError(f"cannot connect to RabbitMQ at {redact(amqp.url)}: {reason}") from exc
