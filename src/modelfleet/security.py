"""Security helpers: who sent a heartbeat, TLS contexts, and declaring with least privilege.

* **Heartbeat senders.** A worker stamps each heartbeat with the AMQP ``user_id`` property set to
  the user of its connection; RabbitMQ refuses (PRECONDITION_FAILED) a message whose ``user_id``
  is not the publishing connection's user, so the property cannot be forged. The controller
  keeps heartbeats only from ``security.heartbeat_users`` (empty = from anyone).
* **TLS.** ``amqps://`` URLs get an :class:`ssl.SSLContext` built from ``amqp.ca_file``
  (default: the system's CAs) and, for mutual TLS, ``amqp.cert_file`` / ``amqp.key_file``.
* **Least privilege.** A producer or worker created by ``modelfleet permissions`` may not
  declare the namespace's exchanges (only a controller may). :func:`declare_where_allowed` tries
  the usual idempotent declarations on a throw-away channel and, when the broker refuses them,
  only checks that what the caller needs exists.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from modelfleet.config import AmqpSettings
from modelfleet.errors import BrokerError, ConfigError

__all__ = [
    "amqp_user",
    "declare_where_allowed",
    "heartbeat_sender_allowed",
    "ssl_context",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


def amqp_user(url: str) -> str | None:
    """The user an AMQP URL logs in as, or None when the URL names none.

    None (rather than aio-pika's implicit ``guest``) for a URL without a user: with EXTERNAL
    (certificate) authentication the user is the certificate's, and a wrong ``user_id`` would
    make the broker close the publishing channel.
    """
    username = urlsplit(url).username
    return unquote(username) if username else None


def heartbeat_sender_allowed(user_id: str | None, allowed: Collection[str]) -> bool:
    """May a heartbeat published with AMQP ``user_id`` be believed? Empty ``allowed`` = yes."""
    if not allowed:
        return True
    return user_id is not None and user_id in allowed


# Hosts already warned about (once per process, not once per connection).
_WARNED_PLAIN: set[str] = set()


def is_loopback(host: str | None) -> bool:
    """Is ``host`` this machine (where an unencrypted connection crosses no network)?"""
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ssl_context(amqp: AmqpSettings, url: str | None = None) -> ssl.SSLContext | None:
    """The TLS context for ``url`` (default ``amqp.url``): None for ``amqp://``.

    Verifies the broker's certificate and host name against ``amqp.ca_file`` (or the system's
    CAs) and presents ``amqp.cert_file``/``amqp.key_file`` when set (mutual TLS). Raises
    :class:`ConfigError` naming the setting when a file cannot be used.
    """
    target = url or amqp.url
    parts = urlsplit(target)
    tls_files = [f for f in (amqp.ca_file, amqp.cert_file, amqp.key_file) if f]
    if parts.scheme != "amqps":
        if tls_files:
            log.warning(
                "amqp.ca_file/cert_file/key_file are set but %s is not an amqps:// URL: "
                "the connection is NOT encrypted",
                parts.hostname,
            )
        elif not is_loopback(parts.hostname) and parts.hostname not in _WARNED_PLAIN:
            _WARNED_PLAIN.add(parts.hostname or "")
            log.warning(
                "the connection to RabbitMQ at %s is NOT encrypted (amqp://): passwords and jobs "
                "cross the network in clear; use an amqps:// URL (README, Security)",
                parts.hostname,
            )
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=amqp.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"amqp.ca_file: cannot load {amqp.ca_file!r}: {exc}") from None
    if amqp.cert_file:
        try:
            context.load_cert_chain(amqp.cert_file, amqp.key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"amqp.cert_file/key_file: cannot load {amqp.cert_file!r}: {exc}"
            ) from None
    # aio-pika/aiormq would also read ?no_verify_ssl=1 from the URL; with our own context that
    # query parameter is ignored, so refuse it loudly rather than silently verify anyway.
    if dict(parse_qsl(parts.query)).get("no_verify_ssl", "0") != "0":
        raise ConfigError(
            "amqp.url: no_verify_ssl is not supported; set amqp.ca_file to the broker's CA"
        )
    return context


async def declare_where_allowed(
    connection: AbstractConnection,
    channel: AbstractChannel,
    declare: Callable[[AbstractChannel], Awaitable[T]],
    *,
    required: Sequence[str],
) -> T | None:
    """Run ``declare`` on ``channel`` if this user may; else check the ``required`` exchanges.

    The attempt runs first on a throw-away plain channel: an ACCESS_REFUSED closes the channel
    it happens on, and a robust channel would then reopen and replay itself behind our back.
    When allowed, ``declare`` runs again on ``channel`` (idempotent) so that channel re-declares
    the topology after a reconnect exactly as before; its result is returned. When refused
    (a least-privilege producer or worker), the ``required`` exchanges must already exist (a
    controller declares them) and None is returned; the caller then uses passive look-ups.
    """
    probe = await _plain_channel(connection)
    try:
        await declare(probe)
    except aiormq.exceptions.ChannelAccessRefused as exc:
        log.info("may not declare the topology (%s); checking that it exists", exc)
    else:
        return await declare(channel)
    finally:
        if not probe.is_closed:
            await probe.close()
    for name in required:
        check = await _plain_channel(connection)
        try:
            await check.declare_exchange(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise BrokerError(
                f"exchange {name!r} does not exist and this user may not declare it: "
                "start a controller first (it declares the namespace)"
            ) from None
        finally:
            if not check.is_closed:
                await check.close()
    return None


async def _plain_channel(connection: AbstractConnection) -> AbstractChannel:
    """A channel that stays closed when the broker closes it (never a robust one)."""
    channel = aio_pika.Channel(connection, publisher_confirms=False)
    await channel.initialize()
    return channel
