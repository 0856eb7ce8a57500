"""A blocking client for scripts, notebooks and WSGI apps: :class:`SyncClient`.

>>> from modelfleet import SyncClient
>>> with SyncClient(url="amqp://guest:guest@127.0.0.1/", namespace="modelfleet") as client:
...     print(client.submit("llama", {"prompt": "hi"}, timeout=30))
...     with client.stream("llama", {"prompt": "hi there"}) as stream:
...         for chunk in stream:
...             print(chunk)
...     print(stream.result)

It is the async :class:`~modelfleet.client.Client`, run on an event loop of its own in one
background daemon thread (``settings.event_loop`` picks the loop, see :mod:`modelfleet.runtime`).
Every call hands its coroutine to that loop and blocks the calling thread until the answer:
any number of threads may share one SyncClient, their jobs travel concurrently over its one
connection. The errors are the async client's: :class:`~modelfleet.errors.NoWorkerError`,
:class:`~modelfleet.errors.JobTimeoutError`, :class:`~modelfleet.errors.WorkerError`, ... for a
job, :class:`~modelfleet.errors.BrokerError` for the broker (or a closed client).

A job the caller gives up on is cancelled on the workers as with the async client: a stream
closed (``with``, :meth:`SyncJobStream.close`), broken out of and dropped, or garbage collected;
a blocked call interrupted by Ctrl-C (``KeyboardInterrupt``), best effort.

In a forking server (gunicorn with ``--preload``), create the client in each worker process:
its thread does not survive a fork.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from modelfleet.client import Client, JobStream
from modelfleet.config import Settings
from modelfleet.errors import BrokerError
from modelfleet.runtime import loop_factory

__all__ = ["SyncClient", "SyncJobStream"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# A blocked call wakes this often to look for an interrupt: Ctrl-C is then seen at once even
# where a lock wait cannot be interrupted (Windows).
_WAKE_S = 0.25
# Bounds on close(): the async client's close, then the thread's end (each).
_CLOSE_TIMEOUT_S = 10.0

_NEW, _CONNECTING, _OPEN, _CLOSED = "new", "connecting", "open", "closed"

# Tasks started from another thread (a stream dropped without close): held until done.
_background: set[asyncio.Task[None]] = set()


class _End:
    """What the loop answers once a stream has no more chunks (internal)."""


_END = _End()


def _closed_error() -> BrokerError:
    return BrokerError(
        "client is closed: create a new SyncClient (or use it inside 'with SyncClient(...)')"
    )


def _wait(future: concurrent.futures.Future[T]) -> T:
    """The future's result; interrupted (Ctrl-C), the call is cancelled in the loop."""
    try:
        while not future.done():
            concurrent.futures.wait((future,), timeout=_WAKE_S)
    except BaseException:
        future.cancel()  # its task is cancelled: a job is then cancelled on the workers
        raise
    return future.result()


class _LoopThread:
    """One event loop, run in a daemon thread until :meth:`stop` (internal)."""

    def __init__(self, factory: Callable[[], asyncio.AbstractEventLoop] | None) -> None:
        self._factory = factory
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.opening: asyncio.Task[None] | None = None  # the client's connect, in the loop
        self.pid = os.getpid()  # a forked child has the object, not the thread
        self.thread = threading.Thread(target=self._run, name="modelfleet-sync-client", daemon=True)

    def start(self) -> asyncio.AbstractEventLoop:
        self.thread.start()
        self._started.wait()
        if self.loop is None:
            self.thread.join()
            raise BrokerError(f"cannot start the client's event loop: {self._error!r}")
        return self.loop

    def _run(self) -> None:
        try:
            # Runner: at the end, left-over tasks are cancelled, async generators closed.
            with asyncio.Runner(loop_factory=self._factory) as runner:
                runner.run(self._serve())
        except BaseException as exc:
            self._error = exc
            log.exception("the SyncClient's event loop failed")
        finally:
            self._started.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self._started.set()
        await self._stop.wait()

    def in_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def stop(self) -> None:
        """Stop the loop and wait for the thread (bounded; not from the thread itself)."""
        self.stop_soon()
        if not self.in_thread() and self.thread.ident is not None:
            self.thread.join(_CLOSE_TIMEOUT_S)
            if self.thread.is_alive():
                log.warning("the SyncClient's thread did not stop within %gs", _CLOSE_TIMEOUT_S)

    def stop_soon(self) -> None:
        """Let the loop end (its thread then ends), without waiting."""
        loop, stop = self.loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                loop.call_soon_threadsafe(stop.set)


async def _shutdown(runner: _LoopThread, client: Client) -> None:
    """Close ``client`` in ``runner``'s loop (a connect under way ends first)."""
    opening = runner.opening
    if opening is not None and not opening.done():
        opening.cancel()  # Client.close then cleans up after it
        await asyncio.wait([opening])
    await client.close()


async def _shutdown_then_stop(runner: _LoopThread, client: Client) -> None:
    try:
        await _shutdown(runner, client)
    finally:
        runner.stop_soon()


def _close(runner: _LoopThread, client: Client) -> None:
    """Close ``client``, then stop ``runner``; also what a SyncClient dropped unclosed (or
    still open at exit) gets. In the loop's own thread (a garbage collection there), only
    starts it."""
    if runner.pid != os.getpid():
        return  # a forked child: the thread (and the connection's use) stayed in the parent
    loop = runner.loop
    if loop is None or loop.is_closed():
        runner.stop()
        return
    if runner.in_thread():
        task = loop.create_task(_shutdown_then_stop(runner, client))
        _background.add(task)
        task.add_done_callback(_background.discard)
        return
    try:
        future = asyncio.run_coroutine_threadsafe(_shutdown(runner, client), loop)
        future.result(timeout=_CLOSE_TIMEOUT_S)
    except Exception as exc:
        log.warning("closing the SyncClient's connection: %s", str(exc) or type(exc).__name__)
    finally:
        runner.stop()


class SyncClient:
    """A blocking :class:`~modelfleet.client.Client`, safe to share between threads.

    Keywords are the async client's, passed through: ``settings``, ``url``, ``namespace``,
    ``timeout`` (the default job deadline in seconds).

    >>> client = SyncClient(namespace="modelfleet")   # e.g. once per WSGI worker process
    >>> client.connect()                              # BrokerError if RabbitMQ is unreachable
    >>> client.submit("llama", {"prompt": "hi"})      # from any thread
    >>> client.close()                                # blocked calls raise BrokerError

    Calls before :meth:`connect` or after :meth:`close` raise
    :class:`~modelfleet.errors.BrokerError`; a blocking call made from the client's own
    event-loop thread (a callback of its loop) raises :class:`RuntimeError` instead of waiting
    for itself forever.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        url: str | None = None,
        namespace: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self._client = Client(settings, url=url, namespace=namespace, timeout=timeout)
        self._lock = threading.Lock()  # guards the state; never held while a call waits
        self._connect_lock = threading.Lock()  # one connect at a time
        self._state = _NEW
        self._runner: _LoopThread | None = None
        # Closes the client and stops its thread if this object is dropped unclosed, or at exit.
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def settings(self) -> Settings:
        return self._client.settings

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet answered (0 once closed)."""
        return self._client.pending

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop of the client's thread while connected (None before and after): for
        your own coroutines, with ``asyncio.run_coroutine_threadsafe(coro, client.loop)``."""
        runner = self._runner
        return None if runner is None else runner.loop

    def __enter__(self) -> SyncClient:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def connect(self) -> None:
        """Start the loop thread and connect (nothing if connected). Raises
        :class:`~modelfleet.errors.BrokerError` when RabbitMQ cannot be reached within
        ``amqp.connect_timeout_s``; the thread is then stopped and ``connect`` may be tried
        again."""
        with self._connect_lock:
            with self._lock:
                if self._state == _OPEN:
                    return
                if self._state == _CLOSED:
                    raise _closed_error()
                runner = _LoopThread(loop_factory(self._client.settings.event_loop))
                loop = runner.start()
                self._runner, self._state = runner, _CONNECTING
                future = asyncio.run_coroutine_threadsafe(self._open(runner), loop)
            try:
                _wait(future)
            except BaseException as exc:
                with self._lock:
                    closed = self._state == _CLOSED
                    if not closed:
                        self._state, self._runner = _NEW, None
                if closed:  # close() ran meanwhile, and stops the thread
                    if isinstance(exc, BrokerError | concurrent.futures.CancelledError):
                        raise _closed_error() from None
                    raise
                _close(runner, self._client)  # whatever the connect left half-made, and the thread
                # The failed client's loop is gone with its thread: a retry starts afresh.
                client = self._client
                self._client = Client(
                    client.settings,
                    url=client.url,
                    namespace=client.names.ns,
                    timeout=client.timeout,
                )
                raise
            with self._lock:
                if self._state == _CONNECTING:
                    self._state = _OPEN
                    self._finalizer = weakref.finalize(self, _close, runner, self._client)
                    return
            raise _closed_error()  # close() ran meanwhile (and closed the connection)

    async def _open(self, runner: _LoopThread) -> None:
        runner.opening = asyncio.current_task()
        await self._client.connect()

    def close(self) -> None:
        """Close the connection and stop the thread; idempotent, from any thread. Calls blocked
        in other threads raise :class:`~modelfleet.errors.BrokerError` ("client is closed")."""
        with self._lock:
            runner = self._runner
            if runner is not None and runner.in_thread():
                raise RuntimeError(
                    "SyncClient.close() called from the client's own event-loop thread: it "
                    "would wait for itself; call it from another thread"
                )
            previous, self._state = self._state, _CLOSED
            finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer.detach()
        if runner is None:
            return
        if previous == _CLOSED:
            runner.stop()  # another close() is under way: return once the thread is gone
            return
        _close(runner, self._client)

    def _schedule(
        self, what: str, make: Callable[[], Coroutine[Any, Any, T]]
    ) -> concurrent.futures.Future[T]:
        """Hand the coroutine ``make()`` to the loop (made only once the client is usable)."""
        with self._lock:
            runner = self._runner
            if runner is not None and runner.in_thread():
                raise RuntimeError(
                    f"SyncClient.{what}() called from the client's own event-loop thread: it "
                    "would wait for itself forever; use the async Client (await) there"
                )
            if self._state == _CLOSED:
                raise _closed_error()
            if self._state != _OPEN or runner is None or runner.loop is None:
                raise BrokerError(
                    "client is not connected: call connect() first, or use "
                    "'with SyncClient(...) as client'"
                )
            if os.getpid() != runner.pid:
                raise BrokerError(
                    "this SyncClient was connected in another process (its thread did not "
                    "survive the fork): create the client in each worker process"
                )
            return asyncio.run_coroutine_threadsafe(make(), runner.loop)

    def _result(self, future: concurrent.futures.Future[T]) -> T:
        try:
            return _wait(future)
        except concurrent.futures.CancelledError:
            # Only the loop's end cancels a call that was not interrupted: close().
            raise _closed_error() from None
        except BrokerError as exc:
            if self._state == _CLOSED:
                raise _closed_error() from exc
            raise

    def _call(self, what: str, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return self._result(self._schedule(what, make))

    def submit(self, model: str, payload: Any = None, *, timeout: float | None = None) -> Any:
        """Run a job and return its result, blocking this thread (others may submit meanwhile).

        >>> client.submit("llama", {"prompt": "hi"}, timeout=30)

        Raises what :meth:`Client.submit <modelfleet.client.Client.submit>` does:
        :class:`~modelfleet.errors.NoWorkerError`, :class:`~modelfleet.errors.JobTimeoutError`,
        :class:`~modelfleet.errors.WorkerError`, ... and
        :class:`~modelfleet.errors.BrokerError`. Interrupted (Ctrl-C), the job is cancelled on
        the workers (best effort) and ``KeyboardInterrupt`` goes on.
        """
        return self._call("submit", lambda: self._client.submit(model, payload, timeout=timeout))

    def stream(
        self, model: str, payload: Any = None, *, timeout: float | None = None
    ) -> SyncJobStream:
        """Run a streaming job: an iterator over its chunks, ``.result`` after.

        >>> with client.stream("llama", {"prompt": "hi"}) as stream:
        ...     text = "".join(chunk["text"] for chunk in stream)
        >>> stream.result

        The job is sent when the iteration starts. Raises what :meth:`submit` does, and
        :class:`~modelfleet.errors.StreamRestartedError`."""

        async def make() -> JobStream:
            return self._client.stream(model, payload, timeout=timeout)

        return SyncJobStream(self, self._call("stream", make))

    def cancel(self, job_id: str) -> None:
        """Cancel a job of this client (see :meth:`Client.cancel
        <modelfleet.client.Client.cancel>`): its waiting caller gets
        :class:`~modelfleet.errors.JobCancelledError`, its worker stops it."""
        self._call("cancel", lambda: self._client.cancel(job_id))


class SyncJobStream:
    """Iterator over a streamed job's chunks (from :meth:`SyncClient.stream`); ``result`` holds
    the final value after the last chunk.

    Leaving early cancels the job on its worker: :meth:`close` (or ``with``; any thread), or
    dropping the stream (garbage collection). Iterate it from one thread at a time (concurrent
    ``next`` calls wait for each other)."""

    def __init__(self, owner: SyncClient, stream: JobStream) -> None:
        self._owner = owner
        self._stream = stream
        self._lock = threading.Lock()  # one next() at a time
        self._ended = False  # no more chunks: exhausted, failed or closed
        self._closed = False  # close() was called
        # In the loop's thread only:
        self._chunks: AsyncGenerator[Any, None] | None = None
        self._task: asyncio.Task[Any] | None = None  # the next() under way
        self._left = False  # close ran in the loop: no next() may start the job

    @property
    def job_id(self) -> str:
        return self._stream.job_id

    @property
    def model(self) -> str:
        return self._stream.model

    @property
    def result(self) -> Any:
        """The job's final result, once the iteration is over (None before)."""
        return self._stream.result

    @property
    def done(self) -> bool:
        """The job's result came."""
        return self._stream.done

    def __iter__(self) -> SyncJobStream:
        return self

    def __next__(self) -> Any:
        with self._lock:
            if self._ended or self._closed:
                raise StopIteration
            try:
                chunk = _wait(self._owner._schedule("stream iteration", self._next))
            except concurrent.futures.CancelledError:
                self._ended = True
                if self._closed:
                    raise StopIteration from None  # close() from another thread
                raise _closed_error() from None  # the client closed
            except BrokerError as exc:
                self._ended = True
                if self._owner.closed:
                    raise _closed_error() from exc
                raise
            except BaseException:
                self._ended = True
                raise
            if isinstance(chunk, _End):
                self._ended = True
                raise StopIteration
            return chunk

    async def _next(self) -> Any:
        if self._left:
            return _END
        self._task = asyncio.current_task()
        if self._chunks is None:
            chunks = aiter(self._stream)
            assert isinstance(chunks, AsyncGenerator)
            self._chunks = chunks
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            return _END
        finally:
            self._task = None

    def __enter__(self) -> SyncJobStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Leave the stream now, from any thread: a job not finished yet is cancelled on its
        worker, and a ``next`` blocked in another thread ends the iteration. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owner.closed:
            return  # closing the client answered the job
        with contextlib.suppress(BrokerError):  # the client closed meanwhile: same
            self._owner._call("stream close", self._leave)

    async def _leave(self) -> None:
        self._left = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # the blocked next() ends (its generator's finally cancels the job)
            await asyncio.wait([task])
        await _abandon(self._stream, self._chunks)

    def __del__(self) -> None:
        # Dropped mid-way (a loop broken out of): cancel the job, without waiting. Never
        # iterated: it was never sent. A next() under way keeps the stream alive.
        if self._ended or self._closed or self._chunks is None:
            return
        runner = self._owner._runner
        loop = runner.loop if runner is not None else None
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: its end closed the stream
            loop.call_soon_threadsafe(_start_abandon, self._stream, self._chunks)


async def _abandon(stream: JobStream, chunks: AsyncGenerator[Any, None] | None) -> None:
    await stream.aclose()  # not answered yet: cancelled on the workers
    if chunks is not None:
        await chunks.aclose()


def _start_abandon(stream: JobStream, chunks: AsyncGenerator[Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(_abandon(stream, chunks))
    _background.add(task)
    task.add_done_callback(_background.discard)
