"""Cancellation logic without a broker: messages, the cancel key and the job id derived from it,
the bounded memory, stopping a running task."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from modelfleet.cancel import (
    CancelledJobs,
    CancelRequest,
    JobCancelled,
    JobCanceller,
    cancel_body,
    cancel_key,
    job_id_for,
    key_matches,
    parse_cancel,
)
from modelfleet.jobs import Job

SECRET = b"s" * 32
K1 = cancel_key(SECRET, 1)
J1 = job_id_for(K1)
K2 = cancel_key(SECRET, 2)
J2 = job_id_for(K2)


def test_cancel_message_round_trip() -> None:
    assert parse_cancel(cancel_body("abc", 123.5, "k1")) == CancelRequest("abc", 123.5, "k1")
    assert parse_cancel(cancel_body("abc")) == CancelRequest("abc", None, "")
    assert json.loads(cancel_body("abc", float("nan"))) == {"cancel": "abc"}


def test_a_malformed_key_parses_as_none() -> None:
    assert parse_cancel(b'{"cancel": "a", "key": 5}') == CancelRequest("a", None, "")
    long_key = json.dumps({"cancel": "a", "key": "k" * 200}).encode()
    assert parse_cancel(long_key) == CancelRequest("a", None, "")


def test_the_job_id_is_the_hash_of_its_key() -> None:
    assert len(K1) == 32 and len(J1) == 32
    assert hashlib.sha256(K1.encode()).hexdigest()[:32] == J1
    assert key_matches(K1, J1)
    assert cancel_key(SECRET, 1) == K1  # derived from the counter: no state per job
    assert K1 != K2 and J1 != J2


def test_only_the_key_of_a_job_matches_its_id() -> None:
    assert not key_matches(K2, J1)  # another job's key
    assert not key_matches(cancel_key(b"t" * 32, 1), J1)  # another producer's secret
    assert not key_matches(J1, J1)  # the id (public, in every message) is not the key
    assert not key_matches("", J1)
    assert not key_matches(K1, "")
    assert not key_matches(K1, "0" * 32)  # an id that is no key's hash: never by a message


def test_keys_and_ids_do_not_collide_over_many_jobs() -> None:
    ids = {job_id_for(cancel_key(SECRET, n)) for n in range(20_000)}
    assert len(ids) == 20_000


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


def _job(job_id: str) -> Job:
    return Job(job_id=job_id, model="m", payload=None, deadline=None, stream=False)


async def test_a_cancelled_job_is_not_started() -> None:
    canceller = JobCanceller("w")
    canceller.cancel(J1, key=K1)
    with pytest.raises(JobCancelled) as info:
        canceller.check(_job(J1))
    assert info.value.started is False
    canceller.check(_job(J2))  # others pass
    assert canceller.refused == 0


async def test_a_cancel_without_the_jobs_key_is_dropped_on_arrival_and_counted() -> None:
    canceller = JobCanceller("w")
    canceller.cancel(J1)  # no key
    canceller.cancel(J1, key=cancel_key(b"t" * 32, 1))  # someone else's
    canceller.cancel(J1, key=K2)  # a valid key, of another job
    canceller.cancel("legacy-id", key=K1)  # an id that is no key's hash
    assert canceller.refused == 4
    assert len(canceller.memory) == 0  # never stored
    canceller.check(_job(J1))  # runs
    canceller.check(_job("legacy-id"))  # runs


async def test_a_flood_of_forged_cancels_does_not_push_out_the_owners() -> None:
    canceller = JobCanceller("w", memory=CancelledJobs(max_ids=8))
    canceller.cancel(J1, key=K1)  # the owner's, before the flood
    for n in range(1000):
        canceller.cancel(J1, key=f"{n:032x}")
        canceller.cancel(f"{n:032x}", key=f"{n:032x}")
    assert canceller.refused == 2000
    with pytest.raises(JobCancelled):
        canceller.check(_job(J1))
    canceller.cancel(J2, key=K2)  # and after the flood
    with pytest.raises(JobCancelled):
        canceller.check(_job(J2))


async def test_a_running_job_is_stopped_only_with_its_key() -> None:
    canceller = JobCanceller("w")
    entered = asyncio.Event()

    async def handler() -> str:
        entered.set()
        await asyncio.sleep(60)
        return "never"

    async def worker_task() -> bool:
        canceller.check(_job(J1))  # as the worker does before running the handler
        try:
            await canceller.run(J1, handler())
        except JobCancelled:
            return True
        return False

    task = asyncio.create_task(worker_task())
    await entered.wait()
    assert canceller.cancel(J1, key="0" * 32) is False
    assert canceller.cancel(J1) is False
    assert canceller.refused == 2
    assert not task.done()
    assert canceller.cancel(J1, key=K1) is True
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
        canceller.check(_job(J1))
        try:
            await canceller.run(J1, handler())
        except JobCancelled as exc:
            assert exc.started is True
        await asyncio.sleep(0)  # the task itself is not cancelled: it can ack
        return "acked"

    task = asyncio.create_task(worker_task())
    await entered.wait()
    assert canceller.cancel(J1, key=K1) is True
    assert canceller.cancel(J1, key=K1) is False  # once
    assert await task == "acked"
    assert handler_saw == ["cancelled"]


async def test_another_cancellation_still_propagates() -> None:
    """The worker's own stop (stop grace) cancels the task too: that one must not be eaten."""
    canceller = JobCanceller("w")
    entered = asyncio.Event()

    async def handler() -> None:
        entered.set()
        await asyncio.sleep(60)

    canceller.check(_job(J1))
    task = asyncio.create_task(canceller.run(J1, handler()))
    await entered.wait()
    canceller.cancel(J1, key=K1)
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
        canceller.check(_job(J1))
        result = await canceller.run(J1, stubborn())
        await asyncio.sleep(0.01)  # would raise if a cancellation were still pending
        current = asyncio.current_task()
        assert current is not None
        return result, current.cancelling()

    task = asyncio.create_task(worker_task())
    await entered.wait()
    assert canceller.cancel(J1, key=K1) is True
    assert await task == ("swallowed", 0)


async def test_thread_handlers_are_not_interrupted() -> None:
    canceller = JobCanceller("w", cancel_running=False)
    entered = asyncio.Event()

    async def handler() -> str:
        entered.set()
        await asyncio.sleep(0.05)
        return "finished"

    canceller.check(_job(J1))
    task = asyncio.create_task(canceller.run(J1, handler()))
    await entered.wait()
    assert canceller.cancel(J1, key=K1) is False
    assert await task == "finished"
    with pytest.raises(JobCancelled):  # but it is remembered: a redelivery is skipped
        canceller.check(_job(J1))


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
        canceller.check(_job(J1))
        try:
            await canceller.run(J1, handler(number))
        except JobCancelled:
            return "cancelled"
        return "ran"

    first = asyncio.create_task(delivery(1))
    second = asyncio.create_task(delivery(2))
    await asyncio.wait_for(both.wait(), 5)
    assert canceller.cancel(J1, key=K1) is True
    assert await asyncio.gather(first, second) == ["cancelled", "cancelled"]
