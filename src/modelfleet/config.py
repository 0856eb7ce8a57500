"""Configuration loader: dynaconf in, frozen pydantic settings out.

This is the only module that imports dynaconf. Sources, lowest precedence first:

1. the defaults below (``config/settings.toml`` documents each one with a comment);
2. a TOML file: ``--config FILE``, else ``$MODELFLEET_CONFIG``, else ``./config/settings.toml``
   when it exists;
3. a secrets file: ``$MODELFLEET_SECRETS_FILE``, else ``./config/.secrets.toml`` when it exists
   (keep credentials there or in the environment, never in settings.toml);
4. environment variables ``MODELFLEET_<SECTION>__<KEY>``, for example ``MODELFLEET_AMQP__URL``,
   ``MODELFLEET_NAMESPACE`` or ``MODELFLEET_HEARTBEAT__TIMEOUT``.

Every duration carries its unit in its name (``interval_s``); the short names the issue tracker
and FastChat users know (``heartbeat.interval``, ``heartbeat.timeout``) are accepted as aliases.
A bad value raises :class:`~modelfleet.errors.ConfigError` with one line naming the key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from modelfleet.errors import ConfigError

__all__ = [
    "AmqpSettings",
    "ClientSettings",
    "GatewaySettings",
    "HeartbeatSettings",
    "HttpSettings",
    "MetricsSettings",
    "RoutingSettings",
    "SecuritySettings",
    "Settings",
    "WorkerSettings",
    "load_settings",
]

ENV_PREFIX = "MODELFLEET"
DEFAULT_CONFIG_PATH = Path("config/settings.toml")
DEFAULT_SECRETS_PATH = Path("config/.secrets.toml")

# A namespace prefixes every exchange and queue name, so keep it to characters that read well in
# `rabbitmqctl list_queues` and never collide with the `.` separator we put between parts.
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class AmqpSettings(_Section):
    # Credentials belong in MODELFLEET_AMQP__URL or the secrets file, not in settings.toml.
    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    # AMQP connection heartbeat: a dead TCP peer is noticed after ~2 of these (the broker's
    # default of 60 s would leave a vanished worker's jobs locked for minutes).
    heartbeat_s: int = Field(5, ge=1, le=600)
    # How long one connection attempt may take before we report the broker unreachable.
    connect_timeout_s: float = Field(10.0, gt=0)
    # Pause between reconnection attempts of a robust connection.
    reconnect_interval_s: float = Field(1.0, gt=0)
    # TLS (amqps:// URLs only; "" = unset): CA bundle that signed the broker's certificate
    # (default: the system's CAs), and a client certificate and key for mutual TLS.
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # Send the AMQP frames written in one event loop turn as one socket write (fewer system
    # calls, fewer broker wake-ups); false = one write per frame, as aiormq does.
    coalesce_writes: bool = True

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _file_exists(cls, value: str) -> str:
        if value and not Path(value).is_file():
            raise ValueError("no such file")
        return value

    @model_validator(mode="after")
    def _key_needs_cert(self) -> AmqpSettings:
        if self.key_file and not self.cert_file:
            raise ValueError("amqp.key_file is set without amqp.cert_file")
        return self

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError("must look like amqp://user:password@host:5672/vhost (or amqps://)")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        return value


class HeartbeatSettings(_Section):
    # Workers publish their state this often.
    interval_s: float = Field(2.0, gt=0, validation_alias=AliasChoices("interval_s", "interval"))
    # A worker silent this long is evicted; three missed heartbeats by default.
    timeout_s: float = Field(6.0, gt=0, validation_alias=AliasChoices("timeout_s", "timeout"))
    # How often the sweeper looks for silent workers: eviction happens within timeout + this.
    sweep_interval_s: float = Field(0.5, gt=0)
    # Mass-silence guard: when more than this share of a fleet of at least `guard_min_workers`
    # goes silent in one sweep, suspect the broker (memory alarm, partition), not the workers.
    guard_silent_ratio: float = Field(0.5, gt=0, le=1)
    guard_min_workers: int = Field(3, ge=2)
    # Heartbeats older than this in the controller's queue are dropped by the broker.
    queue_ttl_s: float = Field(10.0, gt=0)
    # Cap on the controller's heartbeat backlog (drop-head): a slow controller never falls behind.
    queue_max_length: int = Field(100_000, ge=100)

    @model_validator(mode="after")
    def _timeout_above_interval(self) -> HeartbeatSettings:
        if self.timeout_s <= self.interval_s:
            raise ValueError(
                f"heartbeat.timeout_s ({self.timeout_s}) must be larger than "
                f"heartbeat.interval_s ({self.interval_s})"
            )
        return self


class RoutingSettings(_Section):
    # After the last worker of a model goes, wait this long (a restart) before unbinding its
    # queue and failing its backlog with NO_WORKER.
    no_worker_grace_s: float = Field(3.0, ge=0)
    # A job delivered this many times without an answer (it keeps killing workers) dead-letters
    # with reason delivery_limit.
    delivery_limit: int = Field(3, ge=1)
    # A model queue holding this many jobs refuses new ones: the producer gets OVERLOADED.
    max_queue_length: int = Field(100_000, ge=1)
    # Cap on distinct models: bounds queues and metric series a flood of fake names could create.
    max_models: int = Field(1_000, ge=1)
    # How often the controller reads queue depths and re-asserts bindings.
    stats_interval_s: float = Field(2.0, gt=0)
    # Listen-only window after a controller starts (no evictions, no unbinding); default: one
    # heartbeat timeout, so a restart never produces false NO_WORKER errors.
    startup_listen_s: float | None = Field(None, ge=0)
    # A model unbound and workerless this long is forgotten (dropped from status and catalog).
    forget_after_s: float = Field(600.0, gt=0)
    # The error queue is bounded (drop-head) so a storm of failures cannot fill the broker.
    errors_max_length: int = Field(1_000_000, ge=1)


class WorkerSettings(_Section):
    # Jobs one worker runs at once (also its prefetch per model queue).
    concurrency: int = Field(4, ge=1, le=10_000)
    # Jobs one worker may hold per model queue, running or waiting for a slot; 0 (or below
    # concurrency) = concurrency. More hides each ack's round trip for millisecond jobs.
    prefetch: int = Field(0, ge=0, le=65_535)
    # On SIGTERM: how long in-flight jobs may take to finish before they are handed back.
    stop_grace_s: float = Field(30.0, ge=0)
    # A job whose body is larger than this is refused with INVALID_JOB.
    max_payload_bytes: int = Field(1_048_576, ge=64)
    # A job running longer than this is reported stuck in heartbeats.
    stuck_after_s: float = Field(300.0, gt=0)
    # Relative speed advertised to the controller (FastChat's WorkerInfo.speed).
    speed: float = Field(1.0, gt=0)
    # A job running longer than this makes the worker exit (a thread cannot be cancelled) so the
    # broker requeues what it held; unset = never.
    stuck_exit_s: float | None = Field(None, gt=0)


class ClientSettings(_Section):
    # Default deadline of a job, from publish to final answer; also its time-to-live in the queue.
    timeout_s: float = Field(60.0, gt=0)
    # Fail a job at once (NO_WORKER, naming the namespace) when no controller serves the
    # namespace and no worker consumes the model's queue, instead of letting it wait for its
    # deadline. false: only for setups that bind model queues by hand, with no controller.
    fail_fast_without_controller: bool = True


class HttpSettings(_Section):
    # The controller's status API (/v1/models, /v1/workers, /healthz, /metrics).
    host: str = "127.0.0.1"
    port: int = Field(21001, ge=0, le=65535)


class MetricsSettings(_Section):
    # Per-worker series (label `worker`) are exported only while the fleet has at most this many
    # workers, so a large fleet cannot blow up the metric cardinality.
    max_worker_series: int = Field(200, ge=0)


class SecuritySettings(_Section):
    # AMQP users whose heartbeats the controller accepts (the broker checks each heartbeat's
    # user_id against its connection's user); empty = accept heartbeats from any user.
    heartbeat_users: list[str] = Field(default_factory=list)

    @field_validator("heartbeat_users", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        # MODELFLEET_SECURITY__HEARTBEAT_USERS=a,b as well as a TOML/JSON list.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def __hash__(self) -> int:
        # Frozen settings stay hashable although a list (TOML's type) is not.
        return hash((type(self), tuple(self.heartbeat_users)))


class GatewaySettings(_Section):
    # Interface of the OpenAI-compatible gateway (`modelfleet gateway`).
    host: str = "127.0.0.1"
    # Its TCP port; 0 picks a free port.
    port: int = Field(8000, ge=0, le=65535)
    # Bearer API keys it accepts; empty = no authentication. Keep them out of settings.toml:
    # config/.secrets.toml or MODELFLEET_GATEWAY__API_KEYS=key1,key2.
    api_keys: list[str] = Field(default_factory=list)
    # A request with a larger body is refused with 413.
    max_body_bytes: int = Field(1_048_576, ge=1024)
    # Deadline of each request's job, from publish to last chunk (504 after it).
    timeout_s: float = Field(300.0, gt=0)
    # A connection must send a whole request head within this (from its opening, or from the
    # previous answer), and then its whole body within this again, or it is closed (a slow
    # body gets 408): no client can hold a connection by sending nothing, or slowly.
    read_timeout_s: float = Field(30.0, gt=0)
    # Open connections served at once; a request on a connection beyond them gets 503, and such
    # a connection must send its request within a second.
    max_connections: int = Field(1000, ge=1)
    # Listen beyond loopback (a host other than 127.0.0.1, ::1 or localhost) with no api_keys:
    # refused at start unless this is true, and even then logged as a WARNING.
    allow_unauthenticated: bool = False

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        # MODELFLEET_GATEWAY__API_KEYS=a,b as well as a TOML/JSON list.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def __hash__(self) -> int:
        return hash((type(self), self.host, self.port, tuple(self.api_keys)))


class Settings(_Section):
    """All of modelfleet's settings, frozen. Build with :func:`load_settings`."""

    # Prefix of every exchange and queue; two namespaces on one broker never see each other.
    namespace: str = "modelfleet"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # The commands' event loop: uvloop when installed ("auto"), or always "uvloop" / "asyncio".
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    amqp: AmqpSettings = AmqpSettings()
    heartbeat: HeartbeatSettings = HeartbeatSettings()
    routing: RoutingSettings = RoutingSettings()
    worker: WorkerSettings = WorkerSettings()
    client: ClientSettings = ClientSettings()
    http: HttpSettings = HttpSettings()
    metrics: MetricsSettings = MetricsSettings()
    security: SecuritySettings = SecuritySettings()
    gateway: GatewaySettings = GatewaySettings()

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        if not _NAMESPACE_RE.match(value):
            raise ValueError("must be 1-64 characters: letters, digits, '_' or '-'")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def startup_listen_s(self) -> float:
        listen = self.routing.startup_listen_s
        return self.heartbeat.timeout_s if listen is None else listen


def _lower_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k).lower(): _lower_keys(v) for k, v in value.items()}
    return value


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "settings"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown setting"
    shown = first.get("input")
    if first["type"] != "extra_forbidden" and not isinstance(shown, dict):
        if isinstance(shown, str):
            shown = mask_secrets(shown)
        elif "api_keys" in key or "password" in key:
            shown = "***"
        return f"{key}: {message} (got {shown!r})"
    return f"{key}: {message}"


# user:password@ in anything that looks like a URL (even a malformed one).
_URL_PASSWORD = re.compile(r"(//[^/:@\s]*:)[^@\s]*@")


def mask_secrets(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it masked, so that
    no settings error echoes a credential."""
    return _URL_PASSWORD.sub(r"\1***@", text)


# Short names accepted for some settings (section -> short -> canonical).
_ALIASES = {"heartbeat": {"interval": "interval_s", "timeout": "timeout_s"}}


def _resolve_aliases(data: dict[str, Any]) -> None:
    """Keep one of a short and a canonical name when the merged sources hold both.

    dynaconf merges settings.toml (say ``interval_s``) with the environment (say
    ``MODELFLEET_HEARTBEAT__INTERVAL``) into one section holding both names; the environment
    must win, as it does for every other key, so the name it set is the one kept.
    """
    env = {name.upper() for name in os.environ}
    for section, names in _ALIASES.items():
        values = data.get(section)
        if not isinstance(values, dict):
            continue
        for short, canonical in names.items():
            if short not in values or canonical not in values:
                continue
            prefix = f"{ENV_PREFIX}_{section}__".upper()
            if prefix + short.upper() in env and prefix + canonical.upper() not in env:
                values[canonical] = values.pop(short)
            else:
                del values[short]


def settings_from_mapping(data: dict[str, Any]) -> Settings:
    """Validate a plain mapping (sections as nested dicts) into :class:`Settings`."""
    try:
        return Settings.model_validate(_lower_keys(data))
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def load_settings(config_file: str | os.PathLike[str] | None = None) -> Settings:
    """Read the TOML file, secrets and ``MODELFLEET_*`` environment into frozen settings.

    Raises :class:`ConfigError` (one line naming the key) for a bad value or a missing file
    that was asked for explicitly.
    """
    from dynaconf import Dynaconf  # the only dynaconf import in modelfleet

    files: list[str] = []
    explicit = config_file or os.environ.get(f"{ENV_PREFIX}_CONFIG")
    if explicit:
        if not Path(explicit).is_file():
            raise ConfigError(f"config file {str(explicit)!r} does not exist")
        files.append(str(explicit))
    elif DEFAULT_CONFIG_PATH.is_file():
        files.append(str(DEFAULT_CONFIG_PATH))
    secrets = os.environ.get(f"{ENV_PREFIX}_SECRETS_FILE")
    if secrets:
        if not Path(secrets).is_file():
            raise ConfigError(f"secrets file {secrets!r} does not exist")
        files.append(secrets)
    elif DEFAULT_SECRETS_PATH.is_file():
        files.append(str(DEFAULT_SECRETS_PATH))

    try:
        raw = Dynaconf(
            envvar_prefix=ENV_PREFIX,
            settings_files=files,
            environments=False,
            load_dotenv=False,
            merge_enabled=True,
        )
        data = raw.as_dict()
    except Exception as exc:  # dynaconf raises many types for a broken TOML file
        raise ConfigError(f"cannot read settings: {exc}") from None
    # dynaconf echoes its own `load_dotenv` option back as a setting; it is not one of ours.
    # MODELFLEET_CONFIG / _SECRETS_FILE pick files and MODELFLEET_TEST_AMQP_URL picks the test
    # broker: they share our prefix but are not settings.
    # MODELFLEET_PASSWORD_* are read by `modelfleet permissions` only.
    not_settings = (
        "config",
        "secrets_file",
        "load_dotenv",
        "test_amqp_url",
        "password_controller",
        "password_worker",
        "password_producer",
    )
    data = {k: v for k, v in _lower_keys(data).items() if k not in not_settings}
    _resolve_aliases(data)
    return settings_from_mapping(data)
