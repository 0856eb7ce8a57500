"""The blocking client (modelfleet.SyncClient) on a real RabbitMQ, called from threads.

The fleet (controller, worker) runs on the test's event loop; the SyncClient's calls are made
from other threads (run_in_executor / to_thread) so that loop keeps serving the fleet. The
Ctrl-C test runs the other way round: the fleet on a thread of its own, the client blocking the
main thread, which gets a real SIGINT.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest

from modelfleet import SyncClient
from modelfleet.config import Settings, settings_from_mapping
from modelfleet.errors import (
    BrokerError,
    ErrorCode,
    InvalidModelError,
    JobCancelledError,
    JobTimeoutError,
    NoWorkerError,
    WorkerError,
)
from modelfleet.handlers import fake_llm
from modelfleet.jobs import Final, Job
from tests.conftest import Namespace
from tests.helpers import broker_connections, wait_for
from tests.integration.support import Holding, fleet

T = TypeVar("T")

THREAD_NAME = "modelfleet-sync-client"


def sync_threads() -> set[threading.Thread]:
    """The SyncClient loop threads alive now."""
    return {t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()}


@asynccontextmanager
async def sync_client(settings: Settings) -> AsyncIterator[SyncClient]:
    """A connected SyncClient (connect and close from another thread: they block)."""
    client = SyncClient(settings)
    await asyncio.to_thread(client.connect)
    try:
        yield client
    finally:
        await asyncio.to_thread(client.close)


async def in_threads(count: int, work: Callable[[int], T]) -> list[T]:
    """``work(i)`` for i in range(count), each in a thread of its own, all at once."""
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        return await asyncio.gather(*(loop.run_in_executor(pool, work, i) for i in range(count)))


class Dripping:
    """A streaming handler: a chunk every 50 ms for ~10 s; records starts and cancellations."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []

    async def __call__(self, job: Job) -> AsyncIterator[Any]:
        self.started.append(job.job_id)
        try:
            for index in range(200):
                yield {"i": index}
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.cancelled.append(job.job_id)
            raise
        self.finished.append(job.job_id)
        yield Final("all")


# -- many threads over one client -------------------------------------------------------------


@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])
async def test_eight_threads_submit_at_once_and_each_gets_its_own_results(
    ns: Namespace, event_loop: str
) -> None:
    model = ns.model()
    running = 0
    most = 0

    async def handle(job: Job) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.01)
            return {"echo": job.payload, "job": job.job_id}
        finally:
            running -= 1

    settings = ns.settings(event_loop=event_loop)
    before = sync_threads()
    barrier = threading.Barrier(8)
    async with fleet(settings, handle, model, concurrency=50), sync_client(settings) as client:
        assert client.settings.event_loop == event_loop
        # "auto" is uvloop (installed with modelfleet), "asyncio" asyncio's own loop.
        expected = "uvloop" if event_loop == "auto" else "asyncio"
        assert type(client.loop).__module__.split(".")[0] == expected
        assert len(sync_threads() - before) == 1  # one thread, however many callers

        def work(index: int) -> tuple[int, list[Any]]:
            barrier.wait(timeout=10)
            answers = [
                client.submit(model, {"thread": index, "n": n}, timeout=20) for n in range(25)
            ]
            return threading.get_ident(), answers

        results = await in_threads(8, work)
        assert client.pending == 0
    assert len({ident for ident, _ in results}) == 8
    for index, (_, answers) in enumerate(results):
        assert [a["echo"] for a in answers] == [{"thread": index, "n": n} for n in range(25)]
    assert len({a["job"] for _, answers in results for a in answers}) == 200
    assert most >= 4, most  # the threads' jobs really were in flight together
    assert sync_threads() == before  # its thread stopped with close()


# -- streams ------------------------------------------------------------------------------------


async def test_a_stream_is_an_iterator_with_the_result_after(ns: Namespace) -> None:
    model = ns.model()
    words = [f"w{i}" for i in range(20)]
    prompt = " ".join(words)
    async with fleet(ns.settings(), fake_llm, model) as _, sync_client(ns.settings()) as client:

        def consume() -> tuple[list[Any], Any, str, bool]:
            with client.stream(model, {"prompt": prompt}, timeout=10) as stream:
                assert stream.result is None and not stream.done
                chunks = list(stream)
                assert list(stream) == []  # exhausted
                return chunks, stream.result, stream.job_id, stream.done

        chunks, result, job_id, done = await asyncio.to_thread(consume)
        assert chunks == [{"text": w if i == 0 else f" {w}"} for i, w in enumerate(words)]
        assert result == {"text": prompt, "words": 20}
        assert len(job_id) == 32 and done
        assert client.pending == 0


async def test_a_stream_read_in_one_thread_while_others_submit(ns: Namespace) -> None:
    model = ns.model()
    words = [f"s{i}" for i in range(30)]
    async with (
        fleet(ns.settings(), fake_llm, model, concurrency=20),
        sync_client(ns.settings()) as client,
    ):
        streaming = threading.Event()

        def work(index: int) -> Any:
            if index == 0:
                chunks = []
                # 30 chunks, 20 ms apart: the other threads submit all along.
                stream = client.stream(model, {"prompt": " ".join(words), "delay": 0.02})
                for chunk in stream:
                    chunks.append(chunk["text"].strip())
                    streaming.set()
                return chunks, stream.result
            assert streaming.wait(10)
            return [
                client.submit(model, {"prompt": f"t{index} n{n}"}, timeout=10)["text"]
                for n in range(20)
            ]

        results = await in_threads(5, work)
        assert results[0] == (words, {"text": " ".join(words), "words": 30})
        for index in range(1, 5):
            assert results[index] == [f"t{index} n{n}" for n in range(20)]
        assert client.pending == 0


# -- the same errors as the async client -------------------------------------------------------


async def test_the_errors_are_the_async_clients(ns: Namespace) -> None:
    model = ns.model()
    unknown = ns.model("unknown")

    async def handle(job: Job) -> AsyncIterator[Any]:
        if job.payload == "hang":
            await asyncio.sleep(30)
        yield "one"
        if job.payload == "boom":
            raise RuntimeError("model fell over")
        yield Final(job.payload)

    async with fleet(ns.settings(), handle, model) as f, sync_client(ns.settings()) as client:
        await wait_for(lambda: not f.controller.listen_only, what="the controller's listen window")

        def submit(model_name: str, payload: Any, timeout: float = 5) -> BaseException:
            with pytest.raises(Exception) as caught:
                client.submit(model_name, payload, timeout=timeout)
            return caught.value

        error = await asyncio.to_thread(submit, unknown, {"x": 1})
        assert type(error) is NoWorkerError
        assert error.code == ErrorCode.NO_WORKER and error.model == unknown
        assert len(error.job_id) == 32

        error = await asyncio.to_thread(submit, model, "boom")
        assert type(error) is WorkerError and "model fell over" in str(error)
        assert error.model == model

        error = await asyncio.to_thread(submit, model, "hang", 0.5)
        assert type(error) is JobTimeoutError and error.code == ErrorCode.WORKER_TIMEOUT

        error = await asyncio.to_thread(submit, "bad model name!", None)
        assert type(error) is InvalidModelError

        def stream_boom() -> tuple[list[Any], BaseException]:
            received = []
            with pytest.raises(WorkerError) as caught:  # after its chunks, as async
                for chunk in client.stream(model, "boom", timeout=5):
                    received.append(chunk)
            return received, caught.value

        received, error = await asyncio.to_thread(stream_boom)
        assert received == ["one"] and "model fell over" in str(error)
        assert await asyncio.to_thread(client.submit, model, "fine") == "fine"
        assert client.pending == 0


async def test_cancel_from_another_thread_fails_the_waiting_submit(ns: Namespace) -> None:
    model = ns.model()
    handler = Holding()
    async with fleet(ns.settings(), handler, model) as _, sync_client(ns.settings()) as client:
        loop = asyncio.get_running_loop()
        waiting = loop.run_in_executor(None, lambda: client.submit(model, "x", timeout=20))
        await wait_for(lambda: handler.started, timeout=5, what="the job to start")
        await asyncio.to_thread(client.cancel, handler.started[0])
        with pytest.raises(JobCancelledError):
            await asyncio.wait_for(waiting, 5)
        await wait_for(lambda: handler.cancelled, timeout=5, what="the handler cancelled")
        assert handler.cancelled == handler.started
        assert client.pending == 0


# -- leaving a stream cancels its job on the worker --------------------------------------------


async def test_breaking_out_of_a_stream_cancels_the_job_on_the_worker(ns: Namespace) -> None:
    model = ns.model()
    handler = Dripping()
    async with fleet(ns.settings(), handler, model) as _, sync_client(ns.settings()) as client:
        # `with`: leaving the block closes the stream.
        def with_block() -> tuple[str, list[Any]]:
            got = []
            with client.stream(model, None, timeout=20) as stream:
                for chunk in stream:
                    got.append(chunk)
                    if len(got) == 3:
                        break
            return stream.job_id, got

        job_id, got = await asyncio.to_thread(with_block)
        assert got == [{"i": 0}, {"i": 1}, {"i": 2}]
        await wait_for(lambda: job_id in handler.cancelled, timeout=5, what="with: cancelled")

        # No `with`: the stream is dropped as the loop is left (garbage collected).
        def dropped() -> list[Any]:
            got = []
            for chunk in client.stream(model, None, timeout=20):
                got.append(chunk)
                if len(got) == 2:
                    break
            return got

        assert await asyncio.to_thread(dropped) == [{"i": 0}, {"i": 1}]
        assert len(handler.started) == 2
        await wait_for(
            lambda: handler.started[1] in handler.cancelled, timeout=5, what="dropped: cancelled"
        )
        assert handler.finished == []
        await wait_for(lambda: client.pending == 0, timeout=5, what="no job pending")


async def test_close_from_another_thread_ends_a_blocked_iteration(ns: Namespace) -> None:
    model = ns.model()

    started: list[str] = []
    cancelled: list[str] = []

    async def handle(job: Job) -> AsyncIterator[Any]:
        started.append(job.job_id)
        yield "first"
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(job.job_id)
            raise
        yield "never"

    async with fleet(ns.settings(), handle, model) as _, sync_client(ns.settings()) as client:
        stream = await asyncio.to_thread(client.stream, model, None, timeout=30)
        got: list[Any] = []
        reading = asyncio.get_running_loop().run_in_executor(None, lambda: got.extend(stream))
        await wait_for(lambda: got == ["first"], timeout=5, what="the first chunk")
        began = time.monotonic()
        await asyncio.to_thread(stream.close)
        await asyncio.wait_for(reading, 5)  # the blocked next() ended the iteration
        assert time.monotonic() - began < 2
        assert got == ["first"]
        await wait_for(lambda: cancelled == started, timeout=5, what="the handler cancelled")
        assert client.pending == 0
        await asyncio.to_thread(stream.close)  # idempotent
        assert list(stream) == []


# -- closing, connecting, misuse ----------------------------------------------------------------


async def test_close_from_another_thread_fails_a_blocked_submit_promptly(ns: Namespace) -> None:
    model = ns.model()
    handler = Holding()
    before = sync_threads()
    name = f"mft-sync-{uuid.uuid4().hex[:8]}"  # the client's connection, as the broker names it
    async with fleet(ns.settings(), handler, model):
        client = SyncClient(ns.settings(amqp={"url": f"{ns.amqp_url}?name={name}"}))
        await asyncio.to_thread(client.connect)
        (thread,) = sync_threads() - before
        assert await asyncio.to_thread(broker_connections, name) == 1
        loop = asyncio.get_running_loop()
        blocked = loop.run_in_executor(None, lambda: client.submit(model, "x", timeout=30))
        await wait_for(lambda: handler.started, timeout=5, what="the job to start")
        assert client.pending == 1

        began = time.monotonic()
        await asyncio.to_thread(client.close)
        with pytest.raises(BrokerError, match="client is closed"):
            await asyncio.wait_for(blocked, 5)
        assert time.monotonic() - began < 3
        assert not thread.is_alive()
        assert client.closed and client.pending == 0
        # Closed on the broker, cleanly, by the time close() returned (a loop merely stopped
        # would leave its socket to the garbage collector).
        assert await asyncio.to_thread(broker_connections, name) == 0

        # Closed is final, and says so; close again is a no-op.
        client.close()
        for call in (
            lambda: client.submit(model, "y"),
            lambda: client.stream(model, "y"),
            lambda: client.cancel("0" * 32),
            client.connect,
        ):
            with pytest.raises(BrokerError, match="client is closed"):
                call()
        with pytest.raises(BrokerError, match="client is closed"), client:
            pass
        handler.release.set()


def test_connect_to_a_dead_port_raises_broker_error_and_leaves_no_thread() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    settings = settings_from_mapping(
        {
            "namespace": "mft-dead-port",
            "amqp": {"url": f"amqp://guest:guest@127.0.0.1:{port}/", "connect_timeout_s": 5},
        }
    )
    before = set(threading.enumerate())
    client = SyncClient(settings)
    began = time.monotonic()
    with pytest.raises(BrokerError, match="cannot connect to RabbitMQ"):
        client.connect()
    assert time.monotonic() - began < 3
    assert set(threading.enumerate()) <= before  # its loop thread (and any helper) is gone
    assert not client.closed  # a failed connect may be tried again
    with pytest.raises(BrokerError, match="not connected"):
        client.submit("m", None)
    with pytest.raises(BrokerError, match="cannot connect to RabbitMQ"), SyncClient(settings):
        pass
    assert set(threading.enumerate()) <= before
    client.close()
    assert client.closed


async def test_calls_before_connect_say_so_and_connect_is_idempotent(ns: Namespace) -> None:
    client = SyncClient(ns.settings())
    with pytest.raises(BrokerError, match="not connected"):
        client.submit("m", None)
    with pytest.raises(BrokerError, match="not connected"):
        client.stream("m", None)
    before = sync_threads()
    await asyncio.to_thread(client.connect)
    await asyncio.to_thread(client.connect)  # connected already: nothing new
    assert len(sync_threads() - before) == 1
    await asyncio.to_thread(client.close)
    assert sync_threads() == before


async def test_a_client_dropped_unclosed_closes_and_stops_its_thread(ns: Namespace) -> None:
    before = sync_threads()
    name = f"mft-sync-{uuid.uuid4().hex[:8]}"

    def connect_and_drop() -> tuple[int, int]:
        client = SyncClient(ns.settings(amqp={"url": f"{ns.amqp_url}?name={name}"}))
        client.connect()
        alive = len(sync_threads() - before)
        listed = broker_connections(name)
        del client  # never closed: its finalizer closes it
        return alive, listed

    assert await asyncio.to_thread(connect_and_drop) == (1, 1)
    assert sync_threads() == before
    assert await asyncio.to_thread(broker_connections, name) == 0


async def test_url_namespace_and_timeout_keywords_are_passed_through(ns: Namespace) -> None:
    model = ns.model()
    handler = Holding()
    async with fleet(ns.settings(), handler, model):
        # No settings: url and namespace alone must reach the fleet, timeout the deadline.
        client = SyncClient(url=ns.amqp_url, namespace=ns.name, timeout=1)
        await asyncio.to_thread(client.connect)
        try:
            began = time.monotonic()
            with pytest.raises(JobTimeoutError, match="no answer within 1s"):
                await asyncio.to_thread(client.submit, model, "x")
            assert 1 <= time.monotonic() - began < 2
            assert len(handler.started) == 1  # it did reach this namespace's worker
            handler.release.set()
            assert await asyncio.to_thread(client.submit, model, "y", timeout=5) == "y"
        finally:
            await asyncio.to_thread(client.close)


async def test_a_forked_child_is_told_to_make_its_own_client(ns: Namespace) -> None:
    async with sync_client(ns.settings()) as client:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report in one line, never return into pytest
            outcome = "no error"
            try:
                client.submit("m", None)
            except BrokerError as exc:
                outcome = str(exc)
            except BaseException as exc:
                outcome = repr(exc)
            began = time.monotonic()
            client.close()  # must not wait for a thread that stayed in the parent
            outcome += f"|closed in {time.monotonic() - began:.3f}s"
            os.write(write, outcome.encode())
            os._exit(0)
        os.close(write)
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        with os.fdopen(read) as pipe:
            outcome = pipe.read()
        assert os.waitstatus_to_exitcode(status) == 0
        message, took = outcome.split("|")
        assert "connected in another process" in message, message
        assert float(took.removeprefix("closed in ").removesuffix("s")) < 1, took
        assert not client.closed  # the parent's client is untouched


async def test_a_blocking_call_from_the_clients_own_loop_thread_raises(ns: Namespace) -> None:
    async with sync_client(ns.settings()) as client:
        loop = client.loop
        assert loop is not None
        calls: dict[str, Callable[[], object]] = {
            "submit": lambda: client.submit("m", None),
            "stream": lambda: client.stream("m", None),
            "cancel": lambda: client.cancel("0" * 32),
            "close": client.close,
        }

        async def inside() -> dict[str, BaseException | None]:
            caught: dict[str, BaseException | None] = {}
            for name, call in calls.items():
                try:
                    call()
                except BaseException as exc:
                    caught[name] = exc
                else:
                    caught[name] = None
            return caught

        future = asyncio.run_coroutine_threadsafe(inside(), loop)
        caught = await asyncio.wait_for(asyncio.wrap_future(future), 5)
        for name, error in caught.items():
            assert isinstance(error, RuntimeError), (name, error)
            assert "own event-loop thread" in str(error)
        assert not client.closed  # the refused close did nothing


# -- Ctrl-C in the caller -----------------------------------------------------------------------


class ThreadedHolding:
    """Holding, observable from threads without an event loop."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.job_ids: list[str] = []

    async def __call__(self, job: Job) -> Any:
        if job.payload == "quick":
            return "quick"
        self.job_ids.append(job.job_id)
        self.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return job.payload


@contextlib.contextmanager
def fleet_in_a_thread(settings: Settings, handler: Any, model: str) -> Iterator[None]:
    """The fleet on an event loop of its own thread, so the main thread may block."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        state["loop"] = asyncio.get_running_loop()
        state["stop"] = stop = asyncio.Event()
        async with fleet(settings, handler, model):
            ready.set()
            await stop.wait()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            state["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="test-fleet", daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        assert "error" not in state, state.get("error")
        yield
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)
        assert not thread.is_alive()
        assert "error" not in state, state.get("error")


def test_ctrl_c_in_a_blocked_submit_cancels_the_job_and_goes_on(amqp_url: str) -> None:
    assert threading.current_thread() is threading.main_thread()
    namespace = Namespace(amqp_url)
    model = namespace.model()
    handler = ThreadedHolding()
    settings = namespace.settings()
    try:
        with fleet_in_a_thread(settings, handler, model), SyncClient(settings) as client:
            main = threading.main_thread().ident
            assert main is not None

            def interrupt() -> None:
                if handler.started.wait(10):
                    signal.pthread_kill(main, signal.SIGINT)

            interrupter = threading.Thread(target=interrupt, daemon=True)
            interrupter.start()
            began = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                client.submit(model, "slow", timeout=20)
            assert time.monotonic() - began < 5
            interrupter.join(5)
            assert handler.cancelled.wait(5), "the job was not cancelled on the worker"
            assert client.pending == 0
            assert client.submit(model, "quick", timeout=5) == "quick"  # the client goes on
    finally:
        asyncio.run(namespace.cleanup())
