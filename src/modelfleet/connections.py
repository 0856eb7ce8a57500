"""Opening RabbitMQ connections the same way everywhere: robust, short AMQP heartbeat, bounded."""

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
