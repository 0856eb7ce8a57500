"""Cancellation logic without a broker: messages, the cancel key, the bounded memory, stopping a
running task."""

from __future__ import annotations

import asyncio
import json

import pytest

from modelfleet.cancel import (
    MAX_KEYS_PER_JOB,
    CancelledJobs,
    CancelRequest,
    JobCancelled,
    JobCanceller,
    cancel_body,
    cancel_digest,
    cancel_key,
    key_matches,
    parse_cancel,
)
from modelfleet.jobs import Job

SECRET = b"s" * 32


def key(job_id: str) -> str:
    return cancel_key(SECRET, job_id)


def test_cancel_message_round_trip() -> None:
    assert parse_cancel(cancel_body("abc", 123.5, "k1")) == CancelRequest("abc", 123.5, "k1")
    assert parse_cancel(cancel_body("abc")) == CancelRequest("abc", None, "")
    assert json.loads(cancel_body("abc", float("nan"))) == {"cancel": "abc"}


def test_a_malformed_key_parses_as_none() -> None:
    assert parse_cancel(b'{"cancel": "a", "key": 5}') == CancelRequest("a", None, "")
    long_key = json.dumps({"cancel": "a", "key": "k" * 200}).encode()
    assert parse_cancel(long_key) == CancelRequest("a", None, "")


def test_only_the_producers_key_matches_the_jobs_digest() -> None:
    mine = cancel_key(SECRET, "job-1")
    digest = cancel_digest(mine)
    assert len(digest) == 64 and len(mine) == 32
    assert key_matches(mine, digest)
    assert not key_matches(cancel_key(b"t" * 32, "job-1"), digest)  # another producer's secret
    assert not key_matches(cancel_key(SECRET, "job-2"), digest)  # another job's key
    assert not key_matches(digest, digest)  # the digest (public, in the job) is not the key
    assert not key_matches("", digest)
    assert not key_matches(mine, None)  # a job without a digest: never by a message
    assert cancel_key(SECRET, "job-1") == mine  # derived, not drawn: no state per job


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
    assert parse_cancel(b'{"cancel": "a", "deadline": "soon"}') == ("a", None, "")
    assert parse_cancel(b'{"cancel": "a", "deadline": true}') == ("a", None, "")


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


def test_memory_keeps_the_newest_keys_of_a_job() -> None:
    memory = CancelledJobs(max_ids=10, max_keep_s=100)
    for index in range(MAX_KEYS_PER_JOB + 2):
        memory.add("j", keep_s=50, now=0, key=f"k{index}")
    memory.add("j", keep_s=50, now=0, key="k5")  # a repeat is not kept twice
    assert memory.keys("j", now=1) == tuple(f"k{i}" for i in range(2, MAX_KEYS_PER_JOB + 2))
    assert memory.keys("j", now=51) == ()
    assert memory.keys("other", now=1) == ()


def _job(job_id: str, *, digest: bool = True) -> Job:
    return Job(
        job_id=job_id,
        model="m",
        payload=None,
        deadline=None,
        stream=False,
        cancel_digest=cancel_digest(key(job_id)) if digest else None,
    )


async def test_a_cancelled_job_is_not_started() -> None:
    canceller = JobCanceller("w")
    canceller.cancel("j1", key=key("j1"))
    with pytest.raises(JobCancelled) as info:
        canceller.check(_job("j1"))
    assert info.value.started is False
    canceller.check(_job("j2"))  # others pass
    assert canceller.refused == 0


async def test_a_cancel_without_the_jobs_key_is_ignored_and_counted() -> None:
    canceller = JobCanceller("w")
    canceller.cancel("j1")  # no key
    canceller.cancel("j1", key=cancel_key(b"t" * 32, "j1"))  # someone else's
    canceller.cancel("j2", key=key("j2"))  # the right key, but j2 carries no digest
    canceller.check(_job("j1"))  # runs
    canceller.check(_job("j2", digest=False))  # runs
    assert canceller.refused == 2
    canceller.cancel("j1", key=key("j1"))  # its producer's key, among the forged ones
    with pytest.raises(JobCancelled):
        canceller.check(_job("j1"))


async def test_a_running_job_is_stopped_only_with_its_key() -> None:
    canceller = JobCanceller("w")
    entered = asyncio.Event()

    async def handler() -> str:
        entered.set()
        await asyncio.sleep(60)
        return "never"

    async def worker_task() -> bool:
        canceller.check(_job("j1"))  # as the worker does before running the handler
        try:
            await canceller.run("j1", handler())
        except JobCancelled:
            return True
        return False

    task = asyncio.create_task(worker_task())
    await entered.wait()
    assert canceller.cancel("j1", key="0" * 32) is False
    assert canceller.cancel("j1") is False
    assert canceller.refused == 2
    assert not task.done()
    assert canceller.cancel("j1", key=key("j1")) is True
    assert await task is True


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
        canceller.check(_job("j1"))
        try:
            await canceller.run("j1", handler())
        except JobCancelled as exc:
            assert exc.started is True
        await asyncio.sleep(0)  # the task itself is not cancelled: it can ack
        return "acked"

    task = asyncio.create_task(worker_task())
    await entered.wait()
    assert canceller.cancel("j1", key=key("j1")) is True
    assert canceller.cancel("j1", key=key("j1")) is False  # once
    assert await task == "acked"
    assert handler_saw == ["cancelled"]


async def test_another_cancellation_still_propagates() -> None:
    """The worker's own stop (stop grace) cancels the task too: that one must not be eaten."""
    canceller = JobCanceller("w")
    entered = asyncio.Event()

    async def handler() -> None:
        entered.set()
        await asyncio.sleep(60)

    canceller.check(_job("j1"))
    task = asyncio.create_task(canceller.run("j1", handler()))
    await entered.wait()
    canceller.cancel("j1", key=key("j1"))
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
        canceller.check(_job("j1"))
        result = await canceller.run("j1", stubborn())
        await asyncio.sleep(0.01)  # would raise if a cancellation were still pending
        current = asyncio.current_task()
        assert current is not None
        return result, current.cancelling()

    task = asyncio.create_task(worker_task())
    await entered.wait()
    assert canceller.cancel("j1", key=key("j1")) is True
    assert await task == ("swallowed", 0)


async def test_thread_handlers_are_not_interrupted() -> None:
    canceller = JobCanceller("w", cancel_running=False)
    entered = asyncio.Event()

    async def handler() -> str:
        entered.set()
        await asyncio.sleep(0.05)
        return "finished"

    canceller.check(_job("j1"))
    task = asyncio.create_task(canceller.run("j1", handler()))
    await entered.wait()
    assert canceller.cancel("j1", key=key("j1")) is False
    assert await task == "finished"
    with pytest.raises(JobCancelled):  # but it is remembered: a redelivery is skipped
        canceller.check(_job("j1"))


async def test_a_cancel_stops_every_delivery_of_the_job_running_here() -> None:
    """A job delivered again while its first delivery still runs: both are the producer's job,
    and neither hides the other from the cancel."""
    canceller = JobCanceller("w")
    entered: list[int] = []
    both = asyncio.Event()

    async def handler(number: int) -> str:
        entered.append(number)
        if len(entered) == 2:
            both.set()
        await asyncio.sleep(60)
        return "never"

    async def delivery(number: int) -> str:
        canceller.check(_job("j1"))
        try:
            await canceller.run("j1", handler(number))
        except JobCancelled:
            return "cancelled"
        return "ran"

    first = asyncio.create_task(delivery(1))
    second = asyncio.create_task(delivery(2))
    await asyncio.wait_for(both.wait(), 5)
    assert canceller.cancel("j1", key=key("j1")) is True
    assert await asyncio.gather(first, second) == ["cancelled", "cancelled"]
