"""Cancellation logic without a broker: messages, the bounded memory, stopping a running task."""

from __future__ import annotations

import asyncio
import json

import pytest

from modelfleet.cancel import CancelledJobs, JobCancelled, JobCanceller, cancel_body, parse_cancel
from modelfleet.jobs import Job


def test_cancel_message_round_trip() -> None:
    assert parse_cancel(cancel_body("abc", 123.5)) == ("abc", 123.5)
    assert parse_cancel(cancel_body("abc")) == ("abc", None)
    assert json.loads(cancel_body("abc", float("nan"))) == {"cancel": "abc"}


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"cancel": 5}',
        b'{"cancel": ""}',
        b'{"other": "x"}',
        json.dumps({"cancel": "x" * 300}).encode(),
        b"{" + b" " * 2000 + b"}",
    ],
)
def test_bad_cancel_messages_are_ignored(body: bytes) -> None:
    assert parse_cancel(body) is None


def test_bad_deadline_means_none() -> None:
    assert parse_cancel(b'{"cancel": "a", "deadline": "soon"}') == ("a", None)
    assert parse_cancel(b'{"cancel": "a", "deadline": true}') == ("a", None)


def test_memory_is_bounded_in_time() -> None:
    memory = CancelledJobs(max_ids=10, max_keep_s=100)
    memory.add("a", keep_s=5, now=0)
    memory.add("b", keep_s=None, now=0)  # no deadline: the cap
    memory.add("c", keep_s=10_000, now=0)  # capped too
    assert memory.contains("a", now=5)
    assert not memory.contains("a", now=5.1)
    assert memory.contains("b", now=100)
    assert not memory.contains("b", now=101)
    assert not memory.contains("c", now=101)
    memory.purge(200)
    assert len(memory) == 0


def test_memory_is_bounded_in_count() -> None:
    memory = CancelledJobs(max_ids=3, max_keep_s=100)
    for index in range(5):
        memory.add(f"j{index}", keep_s=50, now=0)
    assert memory.snapshot(now=1) == {"j2", "j3", "j4"}
    assert len(memory) == 3


def _job(job_id: str) -> Job:
    return Job(job_id=job_id, model="m", payload=None, deadline=None, stream=False)


async def test_a_cancelled_job_is_not_started() -> None:
    canceller = JobCanceller("w")
    canceller.cancel("j1")
    with pytest.raises(JobCancelled) as info:
        canceller.check(_job("j1"))
    assert info.value.started is False
    canceller.check(_job("j2"))  # others pass


async def test_a_running_job_is_stopped_and_the_task_goes_on() -> None:
    canceller = JobCanceller("w")
    entered = asyncio.Event()
    handler_saw: list[str] = []

    async def handler() -> str:
        entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            handler_saw.append("cancelled")
            raise
        return "never"

    async def worker_task() -> str:
        try:
            await canceller.run("j1", handler())
        except JobCancelled as exc:
            assert exc.started is True
        await asyncio.sleep(0)  # the task itself is not cancelled: it can ack
        return "acked"

    task = asyncio.create_task(worker_task())
    await entered.wait()
    assert canceller.cancel("j1") is True
    assert canceller.cancel("j1") is False  # once
    assert await task == "acked"
    assert handler_saw == ["cancelled"]


async def test_another_cancellation_still_propagates() -> None:
    """The worker's own stop (stop grace) cancels the task too: that one must not be eaten."""
    canceller = JobCanceller("w")
    entered = asyncio.Event()

    async def handler() -> None:
        entered.set()
        await asyncio.sleep(60)

    task = asyncio.create_task(canceller.run("j1", handler()))
    await entered.wait()
    canceller.cancel("j1")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_handler_that_swallows_the_cancel_leaves_the_task_clean() -> None:
    canceller = JobCanceller("w")
    entered = asyncio.Event()

    async def stubborn() -> str:
        entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            return "swallowed"
        return "slept"

    async def worker_task() -> tuple[str, int]:
        result = await canceller.run("j1", stubborn())
        await asyncio.sleep(0.01)  # would raise if a cancellation were still pending
        current = asyncio.current_task()
        assert current is not None
        return result, current.cancelling()

    task = asyncio.create_task(worker_task())
    await entered.wait()
    canceller.cancel("j1")
    assert await task == ("swallowed", 0)


async def test_thread_handlers_are_not_interrupted() -> None:
    canceller = JobCanceller("w", cancel_running=False)
    entered = asyncio.Event()

    async def handler() -> str:
        entered.set()
        await asyncio.sleep(0.05)
        return "finished"

    task = asyncio.create_task(canceller.run("j1", handler()))
    await entered.wait()
    assert canceller.cancel("j1") is False
    assert await task == "finished"
    with pytest.raises(JobCancelled):  # but it is remembered: a redelivery is skipped
        canceller.check(_job("j1"))
