"""The upstream adapter: any OpenAI-compatible server (vLLM, TGI, llama.cpp, Ollama, ...) as a
fleet worker.

    modelfleet worker --model llama-3-8b --upstream http://gpu-1:8000/v1

:class:`Upstream` is a worker handler (an async generator) that forwards each job to the
server with httpx: the payload is the OpenAI request body (``"endpoint"`` picks the path:
``/chat/completions``, ``/completions`` or ``/embeddings``, the default guessed from the body);
a streamed job is requested with ``stream: true`` and each server-sent event becomes a chunk,
so streaming is kept end to end. The server's errors become modelfleet error codes:

==================================  ======================
upstream answer                     producer sees
==================================  ======================
429 or 503                          OVERLOADED (42903)
other 4xx                           INVALID_JOB (40001)
other 5xx, a connection error,      WORKER_ERROR (50001)
a stream cut before ``[DONE]``
no answer before the job's deadline WORKER_TIMEOUT (50006)
==================================  ======================

Health: every ``heartbeat.interval_s`` the adapter asks ``GET {URL}/models`` (or the health URL
given). While that fails the worker is paused (:meth:`Worker.pause`): it cancels its consumers
and heartbeats say ``draining``, so the controller stops routing to it (and, with no other
worker, the model's producers get NO_WORKER at once instead of errors from a dead server); it
resumes as soon as the server answers again. A job that fails to connect triggers a check at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from modelfleet.config import Settings
from modelfleet.errors import (
    InvalidJobError,
    JobError,
    JobTimeoutError,
    OverloadedError,
    WorkerError,
)
from modelfleet.jobs import Final, Job
from modelfleet.openai_shapes import DONE, ENDPOINT_PATHS, endpoint_of, parse_sse_data
from modelfleet.worker import Worker

__all__ = [
    "Upstream",
    "UpstreamWorker",
    "check_upstream_url",
    "error_for_status",
]

log = logging.getLogger(__name__)

# Default deadline of a request to the upstream when the job has none, seconds.
DEFAULT_TIMEOUT_S = 600.0
_ERROR_TEXT_MAX = 500


def check_upstream_url(url: str) -> str:
    """``url`` without a trailing slash, if it is an http(s) URL; else ``ValueError``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"upstream URL {url!r} must look like http://host:port/v1")
    return url.rstrip("/")


def _error_text(data: Any) -> str | None:
    """The message of an error body: OpenAI's ``{"error": {"message"}}`` and kin."""
    if not isinstance(data, dict):
        return None
    error = data.get("error", data)
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])[:_ERROR_TEXT_MAX]
    if isinstance(error, str):
        return error[:_ERROR_TEXT_MAX]
    if isinstance(data.get("detail"), str):  # FastAPI's shape
        return str(data["detail"])[:_ERROR_TEXT_MAX]
    return None


def _error_message(response_text: str) -> str:
    """The upstream's own words: OpenAI's error JSON message when there is one."""
    try:
        data = json.loads(response_text)
    except ValueError:
        data = None
    return _error_text(data) or response_text.strip()[:_ERROR_TEXT_MAX] or "(empty body)"


def error_for_status(status: int, message: str, *, model: str, job_id: str) -> JobError:
    """The modelfleet error for an upstream HTTP error status."""
    if status in (429, 503):
        return OverloadedError(message, model=model, job_id=job_id)
    if 400 <= status < 500:
        return InvalidJobError(message, model=model, job_id=job_id)
    return WorkerError(message, model=model, job_id=job_id)


class Upstream:
    """A worker handler forwarding jobs to the OpenAI-compatible server at ``url``.

    Args:
        url: the server's OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the server expects (default: the request's own ``model``).
        api_key: sent as ``Authorization: Bearer`` when set.
        health_url: checked for health (default ``{url}/models``).
        health_timeout_s: one health check may take this long.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        health_url: str | None = None,
        health_timeout_s: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = check_upstream_url(url)
        self.model = model
        self.health_url = health_url or f"{self.url}/models"
        self.health_timeout_s = health_timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No pool limit beyond the worker's own concurrency; no automatic retries.
        self.http = httpx.AsyncClient(
            headers=headers,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            transport=transport,
        )
        self.healthy: bool | None = None  # None: not checked yet
        self.unhealthy_reason = ""
        self._check_now = asyncio.Event()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- jobs ----------------------------------------------------------------------------

    def _request(self, job: Job) -> tuple[str, dict[str, Any], bool]:
        payload = job.payload
        endpoint = endpoint_of(payload)
        if endpoint is None or not isinstance(payload, dict):
            raise job.invalid(
                "the upstream adapter needs an OpenAI request object with 'endpoint' "
                "(chat.completions, completions or embeddings) or 'messages'/'prompt'/'input'"
            )
        body = {key: value for key, value in payload.items() if key != "endpoint"}
        body["model"] = self.model or body.get("model") or job.model
        stream = job.stream and endpoint != "embeddings"
        if endpoint == "embeddings":
            body.pop("stream", None)
        else:
            body["stream"] = stream
        return f"{self.url}{ENDPOINT_PATHS[endpoint]}", body, stream

    async def __call__(self, job: Job) -> AsyncIterator[Any]:
        url, body, stream = self._request(job)
        remaining = job.remaining()
        timeout = DEFAULT_TIMEOUT_S if remaining is None else max(remaining, 0.001)
        chunks = 0
        try:
            if not stream:
                response = await self.http.post(url, json=body, timeout=timeout)
                if response.status_code >= 400:
                    raise self._http_error(job, url, response.status_code, response.text)
                try:
                    answer = response.json()
                except ValueError:
                    raise WorkerError(
                        f"upstream {url} answered HTTP {response.status_code} with a body that "
                        "is not JSON",
                        model=job.model,
                        job_id=job.job_id,
                    ) from None
                yield Final(answer)
                return
            async with self.http.stream("POST", url, json=body, timeout=timeout) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise self._http_error(job, url, response.status_code, response.text)
                async for line in response.aiter_lines():
                    try:
                        data = parse_sse_data(line)
                    except ValueError:
                        raise WorkerError(
                            f"upstream {url} sent a stream event that is not JSON: {line[:200]!r}",
                            model=job.model,
                            job_id=job.job_id,
                        ) from None
                    if data is None:
                        continue
                    if data == DONE:
                        break
                    if isinstance(data, dict) and data.get("error"):
                        message = _error_text(data) or json.dumps(data)[:_ERROR_TEXT_MAX]
                        raise WorkerError(
                            f"upstream {url} failed mid-stream after {chunks} chunk(s): {message}",
                            model=job.model,
                            job_id=job.job_id,
                        )
                    chunks += 1
                    yield data
            yield Final({"chunks": chunks})
        except httpx.TimeoutException as exc:
            raise JobTimeoutError(
                f"upstream {url} did not answer within {timeout:.1f}s "
                f"({type(exc).__name__}) after {chunks} chunk(s)",
                model=job.model,
                job_id=job.job_id,
            ) from None
        except httpx.HTTPError as exc:
            self._check_now.set()  # a dead server: find out now, not at the next check
            cause = str(exc) or type(exc).__name__
            where = f" mid-stream after {chunks} chunk(s)" if chunks else ""
            raise WorkerError(
                f"upstream {url} connection failed{where}: {cause}",
                model=job.model,
                job_id=job.job_id,
            ) from None

    def _http_error(self, job: Job, url: str, status: int, text: str) -> JobError:
        return error_for_status(
            status,
            f"upstream {url} answered HTTP {status}: {_error_message(text)}",
            model=job.model,
            job_id=job.job_id,
        )

    # -- health --------------------------------------------------------------------------

    async def check(self) -> str:
        """One health check: "" when the server answers 2xx, else why not."""
        try:
            response = await self.http.get(self.health_url, timeout=self.health_timeout_s)
        except httpx.HTTPError as exc:
            return f"GET {self.health_url} failed: {str(exc) or type(exc).__name__}"
        if response.status_code >= 300:
            return f"GET {self.health_url} answered HTTP {response.status_code}"
        return ""

    async def update(self, worker: Worker) -> bool:
        """Check once and pause or resume ``worker`` accordingly; returns healthy or not."""
        reason = await self.check()
        healthy = not reason
        if healthy and self.healthy is not True:
            if self.healthy is False:
                log.warning("upstream %s is healthy again: taking jobs", self.url)
            self.unhealthy_reason = ""
            await worker.resume()
        elif not healthy and (self.healthy is not False or reason != self.unhealthy_reason):
            log.warning("upstream %s is unhealthy (%s): not taking jobs", self.url, reason)
            self.unhealthy_reason = reason
            await worker.pause()
        self.healthy = healthy
        return healthy

    async def watch(self, worker: Worker, interval_s: float) -> None:
        """Check every ``interval_s`` (at once after a connection error), until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await self._check_now.wait()
            self._check_now.clear()
            try:
                await self.update(worker)
            except Exception:  # a broker hiccup while pausing: try again next round
                log.exception("upstream %s: health update failed", self.url)


class UpstreamWorker:
    """A :class:`Worker` serving ``models`` from the server at ``url``, paused while the server
    is unhealthy. :meth:`run` until SIGTERM/SIGINT, or :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        settings: Settings,
        models: Sequence[str],
        url: str,
        *,
        upstream_model: str | None = None,
        api_key: str | None = None,
        health_url: str | None = None,
        concurrency: int | None = None,
        worker_id: str | None = None,
        install_signal_handlers: bool = True,
    ) -> None:
        self.settings = settings
        self.upstream = Upstream(url, model=upstream_model, api_key=api_key, health_url=health_url)
        self.worker = Worker(
            self.upstream,
            models,
            settings=settings,
            concurrency=concurrency,
            worker_id=worker_id,
            install_signal_handlers=install_signal_handlers,
        )
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Not healthy at start: the worker starts paused (no job is taken until it is).
        await self.upstream.update(self.worker)
        await self.worker.start()
        self._watcher = asyncio.create_task(
            self.upstream.watch(self.worker, self.settings.heartbeat.interval_s),
            name="modelfleet-upstream-health",
        )

    async def _unwatch(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def stop(self) -> None:
        await self._unwatch()
        await self.worker.stop()
        await self.upstream.aclose()

    async def __aenter__(self) -> UpstreamWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run(self) -> None:
        await self.start()
        try:
            await self.worker.run()  # stops the worker on the way out
        finally:
            await self._unwatch()
            await self.upstream.aclose()
