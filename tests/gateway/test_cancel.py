"""Cancellation on the real broker: an HTTP client that disconnects from the gateway, and a
producer that cancels (Client.cancel, a closed or abandoned JobStream, a cancelled submit), stop
the job on its worker — a queued job never starts, a running handler is cancelled, the worker
acks and its slot is free at once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest

from modelfleet.client import Client
from modelfleet.controller import Controller
from modelfleet.errors import ErrorCode, JobCancelledError
from modelfleet.handlers import fake_llm
from modelfleet.jobs import Job
from modelfleet.worker import Worker
from tests.conftest import Namespace
from tests.gateway.support import stack
from tests.helpers import wait_for
from tests.integration.support import broker, fleet, ready_count, wait_routable
from tests.integration.test_security import Users

LONG = " ".join(f"w{i}" for i in range(60))  # 60 words: 30 s at 0.5 s a word


class Recorder:
    """An async handler that runs until released, recording starts and cancellations."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.release = asyncio.Event()

    async def __call__(self, job: Job) -> Any:
        self.started.append(job.payload.get("name", job.job_id))
        try:
            if job.payload.get("wait", True):
                await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(self.started[-1])
            raise
        self.finished.append(self.started[-1])
        return {"text": f"done {self.started[-1]}"}


# -- through the gateway --------------------------------------------------------------------------


async def test_stream_disconnect_cancels_the_handler_and_frees_the_slot(ns: Namespace) -> None:
    model = ns.model()
    async with stack(ns) as s:
        worker = await s.add_worker(fake_llm, model, concurrency=1)
        client = s.openai()
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": LONG}],
            stream=True,
            extra_body={"delay": 0.5},
        )
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
        assert worker.in_flight == 1
        await stream.close()  # the HTTP client goes away mid-stream
        gone = time.monotonic()

        await wait_for(lambda: worker.in_flight == 0, timeout=3, what="the slot freed")
        assert time.monotonic() - gone < 3  # not the ~29 s the job had left
        assert worker.counters["cancelled"] == 1
        assert worker.counters["ok"] == 0

        # The only slot is free: a new job runs at once.
        began = time.monotonic()
        reply = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "next please"}]
        )
        assert reply.choices[0].message.content == "next please"
        assert time.monotonic() - began < 2
        assert worker.counters["ok"] == 1


async def test_disconnect_before_the_answer_cancels_a_running_handler(ns: Namespace) -> None:
    model = ns.model()
    handler = Recorder()
    async with stack(ns) as s:
        worker = await s.add_worker(handler, model, concurrency=1)
        impatient = s.openai(timeout=0.5)  # gives up (and disconnects) after 0.5 s
        with pytest.raises(openai.APITimeoutError):
            await impatient.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "x"}], extra_body={"name": "a"}
            )
        await wait_for(lambda: handler.cancelled == ["a"], timeout=3, what="the handler cancelled")
        await wait_for(lambda: worker.in_flight == 0, timeout=3, what="the slot freed")
        assert worker.counters["cancelled"] == 1

        handler.release.set()
        reply = await s.openai().chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], extra_body={"name": "b"}
        )
        assert reply.choices[0].message.content == "done b"
        assert handler.finished == ["b"]


async def test_disconnect_of_a_queued_request_means_it_never_starts(ns: Namespace) -> None:
    model = ns.model()
    handler = Recorder()
    async with stack(ns) as s:
        worker = await s.add_worker(handler, model, concurrency=1)
        http = s.http()

        def request(name: str) -> Any:
            body = {"model": model, "messages": [{"role": "user", "content": "x"}], "name": name}
            return http.post("/v1/chat/completions", json=body)

        first = asyncio.create_task(request("first"))
        await wait_for(lambda: handler.started == ["first"], timeout=5, what="the first job")
        async with httpx.AsyncClient(base_url=s.url, timeout=0.5) as impatient:
            with pytest.raises(httpx.ReadTimeout):  # queued behind "first", then abandoned
                await impatient.post(
                    "/v1/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": "x"}],
                          "name": "second"},
                )  # fmt: skip
        await wait_for(
            lambda: len(worker.cancels.memory) == 1, timeout=5, what="the cancel at the worker"
        )
        handler.release.set()
        assert (await first).status_code == 200
        await wait_for(
            lambda: worker.counters["cancelled"] == 1, timeout=5, what="the queued job skipped"
        )
        assert handler.started == ["first"]  # "second" never started
        assert worker.in_flight == 0


# -- the producer's own cancellations -------------------------------------------------------


async def test_client_cancel_of_a_queued_job(ns: Namespace, amqp_url: str) -> None:
    model = ns.model()
    handler = Recorder()
    async with fleet(ns.settings(), handler, model, concurrency=1) as f:
        first = asyncio.create_task(f.client.submit(model, {"name": "first"}))
        await wait_for(lambda: handler.started == ["first"], timeout=5, what="the first job")

        stream = f.client.stream(model, {"name": "second"})
        collecting = asyncio.create_task(stream.collect())
        async with broker(amqp_url) as connection:

            async def queued() -> bool:
                return await ready_count(connection, ns.names.model_queue(model)) == 1

            await wait_for(queued, timeout=5, what="the second job queued")
        await f.client.cancel(stream.job_id)
        with pytest.raises(JobCancelledError) as info:
            await collecting
        assert info.value.code == ErrorCode.CANCELLED
        assert info.value.job_id == stream.job_id

        handler.release.set()
        assert await first == {"text": "done first"}
        await wait_for(lambda: f.worker.counters["cancelled"] == 1, timeout=5, what="skipped")
        assert handler.started == ["first"]


async def test_leaving_a_stream_cancels_its_job(ns: Namespace) -> None:
    model = ns.model()
    async with fleet(ns.settings(), fake_llm, model, concurrency=1) as f:
        async with f.client.stream(model, {"prompt": LONG, "delay": 0.5}) as stream:
            async for chunk in stream:
                assert chunk == {"text": "w0"}
                break
        await wait_for(lambda: f.worker.in_flight == 0, timeout=3, what="the slot freed")
        assert f.worker.counters["cancelled"] == 1
        began = time.monotonic()
        assert await f.client.submit(model, {"prompt": "quick"}) == {"text": "quick", "words": 1}
        assert time.monotonic() - began < 2


async def test_breaking_out_of_a_stream_without_closing_it_cancels_its_job(
    ns: Namespace,
) -> None:
    model = ns.model()

    async def first_chunk(client: Client) -> Any:
        async for chunk in client.stream(model, {"prompt": LONG, "delay": 0.5}):
            return chunk  # the iterator is dropped: Python closes it, and the job is cancelled
        return None

    async with fleet(ns.settings(), fake_llm, model, concurrency=1) as f:
        assert await first_chunk(f.client) == {"text": "w0"}
        await wait_for(lambda: f.worker.in_flight == 0, timeout=3, what="the slot freed")
        assert f.worker.counters["cancelled"] == 1


async def test_cancelling_a_submit_task_cancels_its_job(ns: Namespace) -> None:
    model = ns.model()
    handler = Recorder()
    async with fleet(ns.settings(), handler, model, concurrency=1) as f:
        task = asyncio.create_task(f.client.submit(model, {"name": "a"}))
        await wait_for(lambda: handler.started == ["a"], timeout=5, what="the job running")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: handler.cancelled == ["a"], timeout=3, what="the handler cancelled")
        await wait_for(lambda: f.worker.in_flight == 0, timeout=3, what="the slot freed")
        assert f.worker.counters["cancelled"] == 1
        assert f.client.pending == 0
        assert await f.client.submit(model, {"name": "b", "wait": False}) == {"text": "done b"}


async def test_a_thread_handler_runs_to_its_end_but_queued_jobs_are_skipped(
    ns: Namespace, amqp_url: str
) -> None:
    """A thread cannot be interrupted (documented): the running job finishes; a queued one that
    was cancelled is still never started."""
    model = ns.model()
    started: list[str] = []
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()

    def blocking(job: Job) -> str:
        started.append(job.payload)
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(timeout=10)
        return str(job.payload)

    async with fleet(ns.settings(), blocking, model, concurrency=1) as f:
        first = asyncio.create_task(f.client.submit(model, "first"))
        await wait_for(lambda: started == ["first"], timeout=5, what="the first job")
        second = asyncio.create_task(f.client.submit(model, "second"))
        async with broker(amqp_url) as connection:

            async def queued() -> bool:
                return await ready_count(connection, ns.names.model_queue(model)) == 1

            await wait_for(queued, timeout=5, what="the second job queued")
        first.cancel()
        second.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        await wait_for(
            lambda: len(f.worker.cancels.memory) == 2, timeout=5, what="the cancels at the worker"
        )
        assert f.worker.in_flight == 1  # the thread still runs
        gate.set()
        await wait_for(
            lambda: f.worker.counters["cancelled"] == 1 and f.worker.counters["ok"] == 1,
            timeout=5,
            what="first finished, second skipped",
        )
        assert started == ["first"]


async def test_least_privileged_users_can_cancel(ns: Namespace, users: Users) -> None:
    """The users `modelfleet permissions` creates may use {ns}.control: a producer's cancel
    reaches the worker, which stops the job and frees its slot."""
    model = ns.model()
    handler = Recorder()
    controller_settings = ns.settings(amqp={"url": users.url("controller")})
    async with Controller(controller_settings) as controller:
        worker = Worker(
            handler,
            [model],
            settings=ns.settings(amqp={"url": users.url("worker")}),
            worker_id="w1",
            concurrency=1,
            install_signal_handlers=False,
        )
        async with worker, Client(ns.settings(amqp={"url": users.url("producer")})) as client:
            await wait_routable(controller, model)
            assert worker.cancels.listening is True

            task = asyncio.create_task(client.submit(model, {"name": "a"}))
            await wait_for(lambda: handler.started == ["a"], timeout=5, what="the job running")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await wait_for(lambda: worker.counters["cancelled"] == 1, timeout=5, what="cancelled")
            await wait_for(lambda: worker.in_flight == 0, timeout=5, what="the slot freed")
            assert handler.finished == []
            assert await client.submit(model, {"name": "b", "wait": False}) == {"text": "done b"}
