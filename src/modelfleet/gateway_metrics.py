"""The gateway's Prometheus metrics and request log: one ASGI middleware,
:class:`RequestObserver`, sees every request (401 and 413 included) from its first byte to the
last byte of its answer, a stream's included.

Metrics live in a registry of the gateway's own (:class:`GatewayMetrics`), so several gateways
in one process do not collide; ``GET /metrics`` serves it. Labels are bounded: ``endpoint`` is
the route template (``/v1/models/{model}``; unknown paths are ``other``) and ``status`` the HTTP
status; no model label, since a model name is whatever a caller sends.

A stream that fails after its status line (200) went out ends with an error event; the request
is still counted with status 200, and also in ``modelfleet_gateway_stream_errors_total``, whose
``code`` label is the error code's name (``WORKER_ERROR``, ``STREAM_RESTARTED``...: bounded).

Each request is logged once, at INFO on ``modelfleet.gateway``, when its answer is complete
(a failed stream's line ends with ``error=CODE_NAME``)::

    POST /v1/chat/completions status=200 duration=0.012s model=llama job=3f2a… stream=false
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelfleet.stats import DURATION_BUCKETS

__all__ = [
    "ENDPOINTS",
    "GatewayMetrics",
    "RequestObserver",
    "RequestRecord",
    "endpoint_label",
    "record_of",
]

# As for the controller: no `_created` series (the switch is process-wide).
disable_created_metrics()  # type: ignore[no-untyped-call]

access_log = logging.getLogger("modelfleet.gateway")

ENDPOINTS = (
    "/v1/models",
    "/v1/models/{model}",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/healthz",
    "/metrics",
    "/docs",
    "/openapi.json",
)
# Time to first token: from 10 ms (a queued job picked up at once) to 2 min (a long queue).
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_SCOPE_KEY = "modelfleet.request"


def endpoint_label(path: str) -> str:
    """The bounded ``endpoint`` label of a request path."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class GatewayMetrics:
    """The gateway's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "modelfleet_gateway_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "modelfleet_gateway_request_duration_seconds",
            "Time from a request's arrival to the last byte of its answer (a whole stream)",
            ["endpoint"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "modelfleet_gateway_time_to_first_token_seconds",
            "Streams: time from a request's arrival to the first chunk carrying text",
            ["endpoint"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "modelfleet_gateway_requests_in_flight",
            "Requests being answered now",
            ["endpoint"],
            registry=self.registry,
        )
        self.stream_errors = Counter(
            "modelfleet_gateway_stream_errors",
            "Streams that failed after their status line (200) was sent, by endpoint and "
            "error code name (WORKER_ERROR, STREAM_RESTARTED, ...)",
            ["endpoint", "code"],
            registry=self.registry,
        )
        for endpoint in ENDPOINTS:  # 0 from the start, rather than "no data"
            self.in_flight.labels(endpoint)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class RequestRecord:
    """What the log line says about one request; the endpoints fill in what they learn."""

    method: str
    path: str
    endpoint: str
    started: float  # time.monotonic()
    model: str | None = None
    job_id: str | None = None
    stream: bool = False
    status: int | None = None
    first_token_s: float | None = None
    # A stream that failed after its status line: the error code's name (``WORKER_ERROR``).
    error: str | None = None

    def first_token(self, metrics: GatewayMetrics) -> None:
        """Note the first chunk with text (once)."""
        if self.first_token_s is None:
            self.first_token_s = time.monotonic() - self.started
            metrics.first_token.labels(self.endpoint).observe(self.first_token_s)

    def log_line(self, duration_s: float) -> str:
        line = (
            f"{self.method} {_printable(self.path)} status={self.status} "
            f"duration={duration_s:.3f}s model={_printable(self.model or '-')} "
            f"job={self.job_id or '-'} stream={'true' if self.stream else 'false'}"
        )
        if self.first_token_s is not None:
            line += f" first_token={self.first_token_s:.3f}s"
        if self.error is not None:
            line += f" error={self.error}"
        return line


def _printable(text: str) -> str:
    """``text`` with control characters escaped: what a caller sends (a path, a model name)
    cannot start a log line of its own."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def record_of(scope: Scope) -> RequestRecord | None:
    """The record :class:`RequestObserver` keeps for this request (None outside it)."""
    record = scope.get(_SCOPE_KEY)
    return record if isinstance(record, RequestRecord) else None


class RequestObserver:
    """ASGI middleware: counts, times and logs every HTTP request."""

    def __init__(self, app: ASGIApp, *, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        record = RequestRecord(
            method=str(scope.get("method", "")),
            path=path,
            endpoint=endpoint_label(path),
            started=time.monotonic(),
        )
        scope[_SCOPE_KEY] = record
        in_flight = self.metrics.in_flight.labels(record.endpoint)
        in_flight.inc()

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except BaseException:
            if record.status is None:
                record.status = 500
            raise
        finally:
            in_flight.dec()
            duration = time.monotonic() - record.started
            status = record.status if record.status is not None else 499
            record.status = status
            self.metrics.requests.labels(record.endpoint, str(status)).inc()
            self.metrics.duration.labels(record.endpoint).observe(duration)
            if record.error is not None:
                self.metrics.stream_errors.labels(record.endpoint, record.error).inc()
            access_log.info("%s", record.log_line(duration))
