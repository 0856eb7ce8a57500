"""The OpenAI-compatible gateway: ``modelfleet gateway``.

A FastAPI app, served by uvicorn in the gateway's own process, that turns OpenAI API requests
into modelfleet jobs:

=============================  ==============================================================
``GET /v1/models``             the routable models, from the controller's status API
``GET /v1/models/{model}``     200: routable now; 404 ``model_not_found``: the controller does
                               not know it; 503: known, but no live worker now
``POST /v1/chat/completions``  a job on the model's queue; ``stream: true`` answered as
``POST /v1/completions``       server-sent events, chunk by chunk, ending with
``POST /v1/embeddings``        ``data: [DONE]``
``GET /healthz``               the gateway's own health: 503 while it has no channel to
                               RabbitMQ (no API key needed)
``GET /metrics``               Prometheus metrics (:mod:`modelfleet.gateway_metrics`; no key)
``GET /docs``                  OpenAPI documentation (``/openapi.json``)
=============================  ==============================================================

A job's payload is the request body plus ``"endpoint"`` (``chat.completions``, ``completions``
or ``embeddings``), so a handler knows what to answer (see :mod:`modelfleet.openai_shapes`;
``modelfleet.handlers:fake_llm`` and the upstream adapter, :mod:`modelfleet.upstream`, answer in
OpenAI's shapes; any other answer is wrapped into them, and ``stop`` is then applied here).
``n`` (and ``best_of``) above 1, and a ``prompt`` list of more than one prompt, are refused
with 400 naming the parameter, whatever the handler: a job has one answer.

Errors come in OpenAI's error JSON, ``{"error": {"message", "type", "param", "code"}}``, with
the HTTP status of their cause and headers that tell OpenAI clients whether a retry can help
(``x-should-retry``, ``Retry-After``: :mod:`modelfleet.gateway_errors`); ``code`` is modelfleet's
numeric error code and the message names the cause, the model and the job. NO_WORKER is 404
``model_not_found`` when the controller does not know the model (never served, or forgotten
after ``routing.forget_after_s``) and 503 when it does (one status API call decides).

When the HTTP client goes away before its answer, the job is cancelled (:mod:`modelfleet.cancel`):
a queued job is never started, a running handler is stopped and its worker's slot freed.

An error after the first chunk of a stream (the status line is sent) ends the stream with an
error event and no ``[DONE]``: among them ``STREAM_RESTARTED`` (50009), when the job restarted on
another worker after text had been sent (the text cannot be taken back, nor spliced with the
new attempt's; the client should retry the request).

Every request is counted and timed in ``/metrics`` and logged once at INFO (method, path,
status, duration, model, job id; ``error=CODE_NAME`` for a stream that failed after its
status line): :mod:`modelfleet.gateway_metrics`. httpx's own request lines (the gateway's calls
to the status API) are kept out of the log (the ``httpx`` logger is set to WARNING).

A port in use or a host that cannot be bound fails :meth:`Gateway.start` with a one-line
:class:`~modelfleet.errors.ConfigError` (``modelfleet gateway`` prints it and exits 2).

Exposure: each connection must send a whole request head within ``gateway.read_timeout_s``
(from its opening, or from its previous answer) and then its body within that again, or it is
closed (a body too slow gets 408); at most ``gateway.max_connections`` connections are served,
a request on one beyond them gets 503 (and such a connection must send it within a second).
Listening beyond loopback with no ``gateway.api_keys`` is refused at start (a one-line
ConfigError) unless ``gateway.allow_unauthenticated`` is true, and then logged as a WARNING.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import secrets
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from typing import Any, Final, TypeVar

import httpx
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from modelfleet import __version__
from modelfleet.client import Client, JobStream
from modelfleet.config import Settings
from modelfleet.errors import BrokerError, ConfigError, InvalidJobError, JobError, NoWorkerError
from modelfleet.gateway_errors import (
    ErrorAnswer,
    answer_for,
    answer_for_status,
    no_worker_answer,
    validation_message,
)
from modelfleet.gateway_metrics import GatewayMetrics, RequestObserver, RequestRecord, record_of
from modelfleet.openai_shapes import (
    DONE,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    StreamShaper,
    as_response,
    chunk_has_text,
    error_body,
    invalid_param,
    model_list,
    refused_param,
    sse,
    stop_sequences,
)
from modelfleet.security import is_loopback

__all__ = [
    "Gateway",
    "bind_error",
    "build_app",
    "default_controller_url",
    "exposure_error",
    "is_exposed",
    "run_gateway",
    "status_of",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# What nginx answers when the client closed the request first (nobody reads it).
CLIENT_CLOSED = 499
# Beyond the limit, a refused body is still read (and dropped) up to this much more, so the
# client, still sending, gets the 413 instead of a reset connection.
_DRAIN_LIMIT = 8 * 1024 * 1024
_CONTROLLER_TIMEOUT_S = 5.0
# NO_WORKER waits at most this long for the status API to say whether the model is known.
_NO_WORKER_LOOKUP_S = 1.0
# A connection beyond gateway.max_connections must send its request head within this, seconds
# (it then gets 503): a flood of silent connections is dropped fast.
_OVER_LIMIT_HEAD_S = 1.0


def status_of(exc: JobError) -> tuple[int, str]:
    """The HTTP status and OpenAI error type for a job error (anything else: 500)."""
    answer = answer_for(exc)
    return answer.status, answer.type


def default_controller_url(settings: Settings) -> str:
    """The controller status API from ``http.host``/``http.port`` (a wildcard host: local)."""
    host = settings.http.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.http.port}"


def _error(
    answer: ErrorAnswer,
    message: str,
    *,
    param: str | None = None,
    code: int | str | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, answer.type, param=param, code=code),
        status_code=answer.status,
        headers=answer.headers,
    )


def _broker_error(exc: BrokerError) -> JSONResponse:
    """The broker refused the job (this gateway's AMQP user may not publish it), or the
    gateway's client is closed (shutting down): nothing the caller can fix, nothing a retry on
    this gateway helps."""
    log.error("job refused by the broker: %s", exc)
    return _error(answer_for_status(502), str(exc), code="broker_error")


def _job_error(exc: JobError) -> JSONResponse:
    param = invalid_param(exc.message) if isinstance(exc, InvalidJobError) else None
    return _error(answer_for(exc), str(exc), param=param, code=int(exc.code))


# -- the guard: API keys and body size, before anything parses the request --------------------


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class _Guard:
    """ASGI middleware: Bearer API keys on ``/v1/*`` (401) and the body size limit (413).

    The body is read here, up to the limit, and replayed to the app, so an oversized or
    unauthorised request never reaches JSON parsing.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: Sequence[str],
        max_body_bytes: int,
        read_timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, key = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
                key = key.strip()
                # Compare with every key, always: no early exit to time.
                return any([secrets.compare_digest(key, allowed) for allowed in self.api_keys])
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        protected = path == "/v1" or path.startswith("/v1/")
        if self.api_keys and protected and not self._authorized(scope):
            await _send_json(
                send,
                401,
                error_body(
                    "missing or wrong API key: send 'Authorization: Bearer <key>' with one of "
                    "the keys in gateway.api_keys",
                    "authentication_error",
                    code="invalid_api_key",
                ),
                [(b"www-authenticate", b"Bearer"), (b"x-should-retry", b"false")],
            )
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await self._read_body(scope, receive, send)
            if body is None:
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        limit = self.max_body_bytes
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        too_large = declared is not None and (not declared.isdigit() or int(declared) > limit)
        body = bytearray()
        more = True
        try:
            # The whole body within gateway.read_timeout_s: a byte now and then holds nothing.
            async with asyncio.timeout(self.read_timeout_s):
                while more and len(body) <= limit + _DRAIN_LIMIT:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    body += message.get("body", b"")
                    more = bool(message.get("more_body", False))
                    if len(body) > limit:
                        too_large = True
        except TimeoutError:
            await _send_json(
                send,
                408,
                error_body(
                    f"request body not received within gateway.read_timeout_s "
                    f"({self.read_timeout_s:g} s; {len(body)} bytes came)",
                    "invalid_request_error",
                    code="request_timeout",
                ),
                [(b"connection", b"close"), (b"x-should-retry", b"false")],
            )
            return None
        if too_large:
            size = declared.decode() if declared is not None else f"more than {limit}"
            await _send_json(
                send,
                413,
                error_body(
                    f"request body is {size} bytes, above gateway.max_body_bytes ({limit})",
                    "invalid_request_error",
                    code="request_too_large",
                ),
                [(b"x-should-retry", b"false")],
            )
            return None
        return bytes(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: http.disconnect when the client goes

    return replay


# -- streaming and disconnects ------------------------------------------------------------------


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer."""


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(awaitable: Awaitable[T], gone: asyncio.Future[None]) -> T:
    """Await ``awaitable`` unless the client goes first: then cancel it (which cancels the job)
    and raise :class:`_ClientGone`."""
    task: asyncio.Future[T] = asyncio.ensure_future(awaitable)
    try:
        either: list[asyncio.Future[Any]] = [task, gone]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise _ClientGone
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


class _EventStream(StreamingResponse):
    """Server-sent events that stop as soon as the client disconnects, whatever the ASGI
    version (the body iterator is then cancelled, and with it the job)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _send_all(self, send: Send) -> None:
        with contextlib.suppress(OSError):  # ASGI 2.4 servers raise when the client is gone
            await self.stream_response(send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self._send_all(send))
        listening = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({streaming, listening}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, listening):
                task.cancel()
            await asyncio.wait({streaming, listening})
        failure = None if streaming.cancelled() else streaming.exception()
        if failure is not None:
            raise failure


_END: Final = object()


async def _next(chunks: AsyncIterator[Any]) -> Any:
    return await anext(chunks, _END)


# -- the app ------------------------------------------------------------------------------------


# Set around a request's submit: told the job's id as soon as the client makes it.
class _Jobs:
    """Runs the endpoints' jobs through one :class:`Client`."""

    def __init__(
        self,
        client: Client,
        settings: Settings,
        controller_url: str,
        http: httpx.AsyncClient,
        metrics: GatewayMetrics,
    ) -> None:
        self.client = client
        self.settings = settings
        self.controller_url = controller_url.rstrip("/")
        self.http = http
        self.metrics = metrics

    async def known_models(self, timeout: float = _CONTROLLER_TIMEOUT_S) -> dict[str, bool]:
        """Every model the controller knows (it had a worker lately, or is in the catalog) →
        whether it is routable now. Raises ``httpx.HTTPError``/``ValueError``/``KeyError``/
        ``TypeError`` when the controller cannot tell."""
        response = await self.http.get(f"{self.controller_url}/v1/models", timeout=timeout)
        response.raise_for_status()
        models = response.json()["models"]
        return {
            str(m["name"]): m.get("routable") is True
            for m in models
            if isinstance(m, dict) and "name" in m
        }

    async def models(self) -> Response:
        try:
            known = await self.known_models()
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            return self._controller_down(exc)
        return JSONResponse(model_list(sorted(name for name, up in known.items() if up)))

    async def model(self, name: str) -> Response:
        try:
            known = await self.known_models()
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            return self._controller_down(exc)
        if name not in known:
            return _error(
                no_worker_answer(known=False),
                f"model {name!r} not found: the controller does not know it (no worker has "
                "served it lately; GET /v1/models lists the models served now)",
                param="model",
                code="model_not_found",
            )
        if not known[name]:
            return _error(
                no_worker_answer(known=True),
                f"model {name!r} is not served now: the controller knows it, but no live worker "
                "takes its jobs (a request for it fails with NO_WORKER until one does)",
                param="model",
                code=50005,
            )
        return JSONResponse(model_list([name])["data"][0])

    def _controller_down(self, exc: Exception) -> Response:
        cause = str(exc) or type(exc).__name__
        return _error(
            answer_for_status(503),
            f"cannot list models: the controller status API at {self.controller_url} did not "
            f"answer ({cause})",
        )

    async def _no_worker(self, exc: NoWorkerError) -> Response:
        """404 for a model the controller does not know, else 503 (see gateway_errors)."""
        try:
            known: bool | None = exc.model in await self.known_models(_NO_WORKER_LOOKUP_S)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as lookup:
            log.debug("NO_WORKER for %s: the status API could not tell (%s)", exc.model, lookup)
            known = None
        if known is False:
            return _error(
                no_worker_answer(known=False),
                f"model {exc.model!r} not found: the controller does not know it (no worker has "
                f"served it lately; GET /v1/models lists the models served now). {exc}",
                param="model",
                code="model_not_found",
            )
        return _error(no_worker_answer(known), str(exc), code=int(exc.code))

    async def _failed(self, exc: JobError | BrokerError, record: RequestRecord | None) -> Response:
        if isinstance(exc, BrokerError):
            return _broker_error(exc)
        if record is not None and exc.job_id != "-":
            record.job_id = exc.job_id
        if isinstance(exc, NoWorkerError):
            return await self._no_worker(exc)
        return _job_error(exc)

    async def run(self, endpoint: str, body: Any, request: Request) -> Response:
        payload: dict[str, Any] = body.model_dump(exclude_unset=True)
        payload["model"] = model = body.model
        payload["endpoint"] = endpoint
        stream = endpoint != "embeddings" and getattr(body, "stream", False) is True
        record = record_of(request.scope)
        if record is not None:
            record.model, record.stream = model, stream
        refused = refused_param(endpoint, payload)
        if refused is not None:
            param, message = refused
            return _error(answer_for_status(400), message, param=param, code=40001)
        stops = stop_sequences(payload.get("stop"))
        timeout = self.settings.gateway.timeout_s
        gone = asyncio.ensure_future(_wait_disconnect(request.receive))
        job_id = ""

        def on_job(started: str) -> None:
            nonlocal job_id
            job_id = started
            if record is not None:
                record.job_id = started

        try:
            if stream:
                return await self._stream(endpoint, model, payload, timeout, gone, stops, record)
            try:
                result = await _unless_gone(
                    self.client.submit(model, payload, timeout=timeout, on_job_id=on_job), gone
                )
            except (JobError, BrokerError) as exc:
                return await self._failed(exc, record)
        except _ClientGone:
            log.info("client of a %s request for %s went away: job cancelled", endpoint, model)
            return Response(status_code=CLIENT_CLOSED)
        finally:
            gone.cancel()
        answer = as_response(
            endpoint, result, model=model, id_=job_id or uuid.uuid4().hex, stop=stops
        )
        if answer is None:
            return _error(
                answer_for_status(500),
                f"model {model!r}: the worker's answer cannot be an OpenAI {endpoint} response "
                f"(embeddings must be a vector or a list of vectors; got "
                f"{json.dumps(result)[:200]})",
                code=50001,
            )
        return JSONResponse(answer)

    async def _stream(
        self,
        endpoint: str,
        model: str,
        payload: dict[str, Any],
        timeout: float,
        gone: asyncio.Future[None],
        stops: list[str],
        record: RequestRecord | None,
    ) -> Response:
        job = self.client.stream(model, payload, timeout=timeout)
        if record is not None:
            record.job_id = job.job_id
        chunks = aiter(job)
        try:
            # The first chunk (or the error) before the status line: errors keep their status.
            first = await _unless_gone(_next(chunks), gone)
        except (JobError, BrokerError) as exc:
            await job.aclose()
            return await self._failed(exc, record)
        except BaseException:
            await job.aclose()
            raise
        shaper = StreamShaper(
            endpoint, model=model, id_=job.job_id, created=int(time.time()), stop=stops
        )
        return _EventStream(self._events(job, chunks, first, shaper, record))

    def _event(self, chunk: dict[str, Any], record: RequestRecord | None) -> bytes:
        if record is not None and chunk_has_text(chunk):
            record.first_token(self.metrics)
        return sse(chunk)

    async def _events(
        self,
        job: JobStream,
        chunks: AsyncIterator[Any],
        first: Any,
        shaper: StreamShaper,
        record: RequestRecord | None,
    ) -> AsyncIterator[bytes]:
        try:
            item = first
            while item is not _END:
                for chunk in shaper.feed(item):
                    yield self._event(chunk, record)
                if shaper.stopped:
                    break  # a stop sequence: the rest is not wanted (aclose cancels the job)
                item = await anext(chunks, _END)
            for chunk in shaper.end(job.result if item is _END else None):
                yield self._event(chunk, record)
            yield sse(DONE)
        except JobError as exc:
            # Mid-stream: the status line is gone; OpenAI clients raise on an error event. The
            # request log and /metrics say so (its status stays 200).
            if record is not None:
                record.error = exc.code.name
            yield sse(error_body(str(exc), answer_for(exc).type, code=int(exc.code)))
        finally:
            await job.aclose()  # cancels the job if the client left before its end


def build_app(
    client: Client,
    settings: Settings,
    *,
    controller_url: str | None = None,
    http: httpx.AsyncClient | None = None,
    metrics: GatewayMetrics | None = None,
) -> FastAPI:
    """The gateway's ASGI app; ``client`` must be connected before requests come. ``metrics``
    (default: new ones) are served on ``/metrics``."""
    gateway = settings.gateway
    metrics = metrics or GatewayMetrics()
    jobs = _Jobs(
        client,
        settings,
        controller_url or default_controller_url(settings),
        http or httpx.AsyncClient(),
        metrics,
    )
    app = FastAPI(
        title="modelfleet OpenAI-compatible gateway",
        version=__version__,
        description=(
            "OpenAI API in front of a modelfleet namespace: each request becomes a job on the "
            "model's queue. Errors use OpenAI's error JSON; `code` is modelfleet's error code "
            "(50005 no worker, 42903 overloaded, 50006 timeout, 50001 worker error, 40001 "
            "invalid job, 40301 invalid model), or `model_not_found` (404) for a model the "
            "fleet does not know. `x-should-retry` and `Retry-After` say whether a retry helps."
        ),
        # A body without Content-Type is read as JSON (a wrong one is refused, saying so).
        strict_content_type=False,
    )
    # Declares the Bearer scheme in /docs; the guard middleware does the checking.
    bearer = HTTPBearer(auto_error=False, description="one of gateway.api_keys, when set")
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(bearer)] if gateway.api_keys else [])

    @v1.get("/models", summary="List the models the fleet serves now")
    async def list_models() -> Response:
        return await jobs.models()

    @v1.get(
        "/models/{model:path}",
        summary="One model: 200 served now, 404 unknown, 503 known without a live worker",
    )
    async def get_model(model: str, request: Request) -> Response:
        record = record_of(request.scope)
        if record is not None:
            record.model = model
        return await jobs.model(model)

    @v1.post("/chat/completions", summary="Chat completion (stream: server-sent events)")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await jobs.run("chat.completions", body, request)

    @v1.post("/completions", summary="Text completion (stream: server-sent events)")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await jobs.run("completions", body, request)

    @v1.post("/embeddings", summary="Embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await jobs.run("embeddings", body, request)

    @app.get("/healthz", summary="The gateway's own health (503 without a channel to RabbitMQ)")
    async def healthz() -> Response:
        healthy = client.ready
        body = {"healthy": healthy, "namespace": client.names.ns, "controller": jobs.controller_url}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics", summary="Prometheus metrics of this gateway", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.include_router(v1)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        message, param = validation_message(
            exc.errors(), exc.body, request.headers.get("content-type")
        )
        return _error(answer_for_status(400), message, param=param, code=40001)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer to a JSON body it could not decode (not UTF-8).
            message = "request body is not valid JSON: it is not UTF-8 text"
        code = 40001 if exc.status_code == 400 else None
        return _error(answer_for_status(exc.status_code), message, code=code)

    app.add_middleware(
        _Guard,
        api_keys=list(gateway.api_keys),
        max_body_bytes=gateway.max_body_bytes,
        read_timeout_s=gateway.read_timeout_s,
    )
    # Outermost: sees the guard's 401 and 413 too.
    app.add_middleware(RequestObserver, metrics=metrics)
    return app


# -- the process --------------------------------------------------------------------------------


def _quiet_http_client_logs() -> None:
    """httpx logs every request it makes at INFO ("HTTP Request: GET .../v1/models"): the
    gateway's own calls to the status API are not requests it serves, so its log keeps only
    its own request lines. Never lowers a level set higher."""
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the Gateway handles SIGTERM/SIGINT itself, and closes its client after


class _TimedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head.

    uvicorn bounds only the idle time after an answer (``timeout_keep_alive``): a connection
    that sends nothing, or half a request head, stays open forever. Here a connection must
    send a whole request head within :attr:`read_timeout_s` of its opening or of its previous
    answer, else it is closed (the body's own deadline is the guard's: 408). A connection
    opened beyond :attr:`max_connections` gets only :data:`_OVER_LIMIT_HEAD_S` (its request
    is answered 503 by uvicorn's ``limit_concurrency``).
    """

    read_timeout_s: float = 30.0
    max_connections: int = 1000
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        deadline = self.read_timeout_s
        if len(self.connections) > self.max_connections:
            deadline = min(deadline, _OVER_LIMIT_HEAD_S)
        self._arm_head_timer(deadline)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer(self.read_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self, delay: float) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(delay, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        # A request being answered is the app's business (its body has the guard's deadline).
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            log.debug("closing a connection that sent no whole request head in time")
            self.transport.close()


def _protocol_class(read_timeout_s: float, max_connections: int) -> type[_TimedH11]:
    class Protocol(_TimedH11):
        pass

    Protocol.read_timeout_s = read_timeout_s
    Protocol.max_connections = max_connections
    return Protocol


def exposure_error(host: str) -> str:
    """The one line refusing to serve ``host`` (beyond loopback) without API keys."""
    return (
        f"gateway.host {host} is reachable beyond this machine and gateway.api_keys is empty: "
        "anyone who reaches it could run jobs; set gateway.api_keys "
        "(MODELFLEET_GATEWAY__API_KEYS), listen on 127.0.0.1, or set "
        "gateway.allow_unauthenticated = true to accept this"
    )


def is_exposed(host: str) -> bool:
    """Does listening on ``host`` reach beyond this machine? ("" = every interface: yes.)"""
    return host == "" or not is_loopback(host)


def bind_error(host: str, port: int, exc: OSError | OverflowError) -> str:
    """The one line saying why ``host:port`` cannot be listened on, and what to change."""
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return (
            f"gateway.port {port} on {host} is in use (another gateway?): pick another with "
            "--port or gateway.port"
        )
    if isinstance(exc, OverflowError) or (
        isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM)
    ):
        hint = "; ports below 1024 need privileges" if 0 < port < 1024 else ""
        return (
            f"gateway.port {port} on {host} cannot be used ({why}{hint}): pick another with "
            "--port or gateway.port"
        )
    return (
        f"gateway.host {host} cannot be bound ({why}): use an address of this machine "
        "(127.0.0.1, or 0.0.0.0 for every interface) with --host or gateway.host"
    )


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, or :class:`ConfigError` saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        sock.close()
        raise ConfigError(bind_error(host, port, exc)) from None
    sock.set_inheritable(True)
    return sock


class Gateway:
    """The gateway: a :class:`Client`, the app, and uvicorn serving it on ``host:port``.

    >>> async with Gateway(settings, port=0) as gateway:
    ...     print(gateway.url)  # http://127.0.0.1:54321
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        controller_url: str | None = None,
    ) -> None:
        self.settings = settings or Settings()
        gateway = self.settings.gateway
        self.host = host or gateway.host
        self.port = gateway.port if port is None else port
        self.controller_url = (controller_url or default_controller_url(self.settings)).rstrip("/")
        self.client = Client(self.settings, timeout=gateway.timeout_s)
        self._http = httpx.AsyncClient()
        self.metrics = GatewayMetrics()
        self.app = build_app(
            self.client,
            self.settings,
            controller_url=self.controller_url,
            http=self._http,
            metrics=self.metrics,
        )
        self._server: _Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Take the port, connect to RabbitMQ, then listen (port 0: a free port, see
        :attr:`port`). A port or host that cannot be taken raises :class:`ConfigError` (one
        line) before anything else is opened; on any failure, everything opened is closed."""
        _quiet_http_client_logs()
        sock: socket.socket | None = None
        gateway = self.settings.gateway
        try:
            sock = _bind(self.host, self.port)
            self.port = int(sock.getsockname()[1])
            if is_exposed(self.host) and not gateway.api_keys:
                if not gateway.allow_unauthenticated:
                    raise ConfigError(exposure_error(self.host))
                log.warning(
                    "the gateway on %s is reachable beyond this machine WITHOUT API keys "
                    "(gateway.allow_unauthenticated = true): anyone who reaches it can run jobs",
                    self.url,
                )
            await self.client.connect()
            config = uvicorn.Config(
                self.app,
                http=_protocol_class(gateway.read_timeout_s, gateway.max_connections),
                # A request on a connection beyond max_connections is answered 503 (uvicorn
                # counts the asking connection among the open ones, hence the + 1).
                limit_concurrency=gateway.max_connections + 1,
                log_config=None,  # keep modelfleet's logging set-up
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=5,
            )
            self._server = _Server(config)
            self._serving = asyncio.create_task(
                self._server.serve(sockets=[sock]), name="modelfleet-gateway"
            )
            async with asyncio.timeout(10):
                while not self._server.started:
                    if self._serving.done():
                        self._serving.result()  # raises what stopped it
                        raise OSError("the HTTP server stopped while starting")
                    await asyncio.sleep(0.01)
        except BaseException:
            await self.stop()
            if sock is not None:
                sock.close()  # not served (closing a socket twice does nothing)
            raise
        log.info(
            "OpenAI-compatible gateway on %s (namespace %s, models from %s, docs at %s/docs)",
            self.url,
            self.client.names.ns,
            self.controller_url,
            self.url,
        )

    async def stop(self) -> None:
        """Stop listening (open requests get a few seconds), then close the client."""
        server, self._server = self._server, None
        serving, self._serving = self._serving, None
        if server is not None:
            server.should_exit = True
        if serving is not None:
            try:
                async with asyncio.timeout(10):
                    await serving
            except TimeoutError:
                if server is not None:
                    server.force_exit = True
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
        await self._http.aclose()
        await self.client.close()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or :meth:`request_stop`), stop."""
        await self.start()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
                installed.append(sig)
        try:
            await self._stop.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()


async def run_gateway(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    controller_url: str | None = None,
) -> int:
    """``modelfleet gateway``: serve until SIGTERM/SIGINT; returns the exit code."""
    await Gateway(settings, host=host, port=port, controller_url=controller_url).run()
    return 0
