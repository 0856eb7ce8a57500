"""``modelfleet errors list|show|replay|purge`` against a real RabbitMQ.

Jobs reach ``{ns}.errors`` the real ways: dead-lettered directly with modelfleet's headers (as the
worker and controller do), rejected by the broker (x-death), or failed by a live worker. The
commands run through :func:`modelfleet.cli.main` with ``--config`` like an operator would.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from modelfleet import cli
from modelfleet.config import Settings
from modelfleet.controller import Controller
from modelfleet.errors import WorkerError
from modelfleet.errors_admin import (
    REPLAYED_HEADER,
    ErrorQueue,
    Selection,
    list_errors,
    purge_errors,
    replay_errors,
    replay_message,
    show_error,
)
from modelfleet.jobs import Job
from modelfleet.messages import ErrorReply, JobRequest, ResultReply
from modelfleet.topology import (
    DEADLINE_HEADER,
    ERROR_HEADER,
    MODEL_HEADER,
    REASON_HEADER,
    Topology,
)
from modelfleet.worker import Worker
from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.integration.support import RawProducer, broker, ready_count, wait_routable


async def dead_letter(
    ns: Namespace,
    *,
    model: str,
    reason: str,
    error: str,
    job_id: str | None = None,
    age_s: float = 0.0,
    reply_to: str | None = None,
    payload: Any = None,
) -> str:
    """Put a job copy in the error queue the way the worker and controller do."""
    job_id = job_id or uuid.uuid4().hex
    body = JobRequest(model=model, payload=payload, deadline=time.time() - 1).model_dump_json()
    async with broker(ns.amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        dead = await Topology(ns.names).declare_dead(channel)
        await dead.publish(
            aio_pika.Message(
                body.encode(),
                content_type="application/json",
                message_id=job_id,
                correlation_id=job_id,
                reply_to=reply_to,
                timestamp=time.time() - age_s,
                headers={
                    REASON_HEADER: reason,
                    ERROR_HEADER: error,
                    MODEL_HEADER: model,
                    DEADLINE_HEADER: round((time.time() - 1) * 1000),
                },
                type="job",
            ),
            routing_key=model,
        )
    return job_id


async def rejected_by_broker(ns: Namespace, model: str, *, sent_age_s: float = 0.0) -> str:
    """A job the broker itself dead-letters now (x-death, reason rejected, no x-mf-* headers);
    ``sent_age_s``: how long ago the job was sent (its message timestamp)."""
    job_id = uuid.uuid4().hex
    async with broker(ns.amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        topology = Topology(ns.names)
        await topology.declare_dead(channel)
        queue = await topology.declare_model_queue(channel, model)
        body = JobRequest(model=model, payload="x").model_dump_json().encode()
        await channel.default_exchange.publish(
            aio_pika.Message(body, message_id=job_id, timestamp=time.time() - sent_age_s),
            routing_key=queue.name,
        )
        message = await queue.get(no_ack=False, timeout=5)
        assert message is not None
        await message.reject(requeue=False)
    return job_id


async def errors_count(ns: Namespace) -> int:
    async with broker(ns.amqp_url) as connection:
        return await ready_count(connection, ns.names.errors)


async def wait_errors(ns: Namespace, count: int) -> None:
    async def enough() -> bool:
        return await errors_count(ns) >= count

    await wait_for(enough, timeout=10, what=f"{count} copies in the error queue")


async def expect_errors(ns: Namespace, count: int) -> None:
    """The error queue holds exactly ``count`` ready copies. Copies a command read and handed back
    return when its channel closes, which a quorum queue applies a moment later: wait for it."""

    async def exact() -> bool:
        return await errors_count(ns) == count

    await wait_for(exact, timeout=10, what=f"exactly {count} copies in the error queue")


def config_file(tmp_path: Path, settings: Settings) -> str:
    path = tmp_path / "settings.toml"
    path.write_text(
        f'namespace = "{settings.namespace}"\n'
        f'[amqp]\nurl = "{settings.amqp.url}"\n'
        f"[client]\ntimeout_s = {settings.client.timeout_s}\n"
    )
    return str(path)


class Cli:
    """Runs ``modelfleet ...`` in-process (in a thread: it runs its own event loop)."""

    def __init__(self, config: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.config = config
        self.capsys = capsys

    async def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = await asyncio.to_thread(cli.main, [*args, "--config", self.config])
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err


@pytest.fixture
def run(ns: Namespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(config_file(tmp_path, ns.settings()), capsys)


def error_of(err: str) -> dict[str, Any]:
    """The failure a command printed last on stderr: one JSON object (stderr is no terminal)."""
    lines = [line for line in err.splitlines() if line.startswith("{")]
    assert lines, f"no JSON failure line on stderr: {err!r}"
    document: dict[str, Any] = json.loads(lines[-1])
    return document


# --- list ---------------------------------------------------------------------------------------


async def test_list_shows_models_reasons_ages_and_leaves_the_queue_intact(
    ns: Namespace, run: Cli
) -> None:
    llama, mistral = ns.model("llama"), ns.model("mistral")
    a = await dead_letter(ns, model=llama, reason="no_worker", error="no worker serves it",
                          age_s=90)  # fmt: skip
    b = await dead_letter(ns, model=mistral, reason="worker_error", error="handler raised X",
                          age_s=60)  # fmt: skip
    c = await dead_letter(ns, model=llama, reason="worker_error", error="handler raised Y",
                          age_s=30)  # fmt: skip
    d = await rejected_by_broker(ns, mistral)
    await wait_errors(ns, 4)
    settings = ns.settings()

    jobs, errors = await list_errors(settings)
    assert [j.job_id for j in jobs] == [a, b, c, d]  # oldest death first
    assert errors.in_queue == 4
    by_id = {j.job_id: j for j in jobs}
    assert (by_id[a].model, by_id[a].reason, by_id[a].error) == (
        llama,
        "no_worker",
        "no worker serves it",
    )
    age = by_id[a].age_s()
    assert age is not None and 88 <= age <= 100
    # The broker's own dead-lettering: reason from x-death, model from the routing key.
    assert (by_id[d].model, by_id[d].reason) == (mistral, "rejected")
    assert ns.names.model_queue(mistral) in by_id[d].error
    assert all(j.replayed == 0 for j in jobs)

    # Nothing was consumed, and listing again lists the same jobs the same way.
    await expect_errors(ns, 4)
    again, _ = await list_errors(settings)
    assert [j.summary(0) for j in again] == [j.summary(0) for j in jobs]

    # Filters and limit.
    only_llama, _ = await list_errors(settings, Selection(model=llama))
    assert [j.job_id for j in only_llama] == [a, c]
    crashed, _ = await list_errors(settings, Selection(reason="worker_error"))
    assert [j.job_id for j in crashed] == [b, c]
    first, errors = await list_errors(settings, limit=2)
    assert [j.job_id for j in first] == [a, b]
    assert errors.matched == 4
    await expect_errors(ns, 4)

    # The command line: a table and JSON.
    code, out, _ = await run("errors", "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["JOB_ID", "MODEL", "REASON", "AGE", "REPLAYED", "ERROR"]
    assert rows[0].split()[:3] == [a, llama, "no_worker"]
    assert "handler raised X" in rows[1]
    assert f"4 shown of 4 matching, by time of death, oldest first; 4 in {ns.names.errors}" in out
    code, out, _ = await run("errors", "list", "--json", "--reason", "worker_error", "--limit", "1")
    assert code == 0
    document = json.loads(out)
    assert document["queue"] == ns.names.errors
    assert document["order"] == "oldest_first"
    assert [j["job_id"] for j in document["jobs"]] == [b]
    assert document["matched"] == 2
    assert document["jobs"][0]["model"] == mistral
    await expect_errors(ns, 4)


async def test_listing_a_namespace_without_an_error_queue_says_so(ns: Namespace, run: Cli) -> None:
    code, _, err = await run("errors", "list")
    assert code == 1
    failure = error_of(err)
    assert failure["error"] == "NOT_FOUND"
    assert failure["namespace"] == ns.name
    assert f"namespace {ns.name!r} has no error queue {ns.names.errors!r}" in failure["message"]


# --- show ---------------------------------------------------------------------------------------


async def test_show_prints_everything_about_one_job(ns: Namespace, run: Cli) -> None:
    model = ns.model()
    job = await dead_letter(
        ns,
        model=model,
        reason="worker_error",
        error="handler raised Boom",
        payload={"prompt": "hello"},
        reply_to="amq.rabbitmq.reply-to.xyz",
    )
    other = await dead_letter(ns, model=model, reason="expired", error="too late")
    await wait_errors(ns, 2)

    copies = await show_error(ns.settings(), job)
    assert len(copies) == 1
    details = copies[0].details()
    assert details["body"]["payload"] == {"prompt": "hello"}
    assert details["headers"][ERROR_HEADER] == "handler raised Boom"
    assert details["properties"]["reply_to"] == "amq.rabbitmq.reply-to.xyz"
    assert details["properties"]["message_id"] == job

    code, out, _ = await run("errors", "show", job)
    assert code == 0
    assert f"job {job} in {ns.names.errors}" in out
    assert "reason:    worker_error" in out
    assert "x-mf-error" in out and "handler raised Boom" in out
    assert '"prompt": "hello"' in out  # the body, pretty-printed
    assert other not in out
    # Read twice now: the broker counted it, and show does not pass that off as the job's.
    assert "x-delivery-count" not in out
    code, out, _ = await run("errors", "show", job, "--json")
    assert json.loads(out)[0]["body"]["model"] == model

    code, _, err = await run("errors", "show", "no-such-job")
    assert code == 1
    failure = error_of(err)
    assert failure["error"] == "NOT_FOUND"
    assert f"no job id in {ns.names.errors} starts with 'no-such-job'" in failure["message"]
    await expect_errors(ns, 2)


# --- replay -------------------------------------------------------------------------------------


class Flaky:
    """A handler that fails until repaired, and remembers what it ran."""

    def __init__(self) -> None:
        self.broken = True
        self.ran: list[tuple[str, Any]] = []

    async def __call__(self, job: Job) -> Any:
        if self.broken:
            raise RuntimeError("weights not loaded")
        self.ran.append((job.job_id, job.payload))
        return {"echo": job.payload}


@pytest.fixture
async def live(ns: Namespace) -> AsyncIterator[tuple[Settings, str, Flaky, Controller]]:
    settings = ns.settings()
    model = ns.model()
    handler = Flaky()
    async with Controller(settings) as controller:
        worker = Worker(handler, [model], settings=settings, install_signal_handlers=False)
        async with worker:
            await wait_routable(controller, model)
            yield settings, model, handler, controller


async def test_replay_makes_a_live_worker_run_the_job_and_removes_it(
    ns: Namespace, run: Cli, live: tuple[Settings, str, Flaky, Controller]
) -> None:
    settings, model, handler, _ = live
    from modelfleet.client import Client

    failed: list[str] = []
    async with Client(settings) as client:
        for payload in ("first", "second"):
            with pytest.raises(WorkerError) as info:
                await client.submit(model, payload)
            failed.append(info.value.job_id)
    other = await dead_letter(ns, model=ns.model("other"), reason="no_worker", error="none")
    await wait_errors(ns, 3)

    handler.broken = False
    code, out, _ = await run("errors", "replay", failed[0], "--timeout", "30")
    assert code == 0, out
    assert (
        f"replayed {failed[0]} to model {model} as job {failed[0]} (was worker_error); "
        "its answer goes nowhere: the original producer is gone"
    ) in out
    await wait_for(lambda: handler.ran == [(failed[0], "first")], what="the replayed job to run")

    remaining, _ = await list_errors(settings)
    assert sorted(j.job_id for j in remaining) == sorted([failed[1], other])

    # --all --model: every job of that model, and nothing else.
    code, out, _ = await run("errors", "replay", "--all", "--model", model)
    assert code == 0
    await wait_for(lambda: len(handler.ran) == 2, what="the second replayed job")
    assert handler.ran[1] == (failed[1], "second")
    remaining, _ = await list_errors(settings)
    assert [j.job_id for j in remaining] == [other]

    # Nothing matches: says so.
    code, _, err = await run("errors", "replay", "--all", "--model", model)
    assert code == 1 and error_of(err)["error"] == "NOT_FOUND"
    assert f"no job in {ns.names.errors} matched" in error_of(err)["message"]
    # No selection at all is a usage error.
    code, _, err = await run("errors", "replay")
    assert code == 2 and error_of(err)["error"] == "USAGE" and "--all" in err


async def test_replay_keep_reply_to_answers_the_original_producer(
    ns: Namespace, live: tuple[Settings, str, Flaky, Controller]
) -> None:
    settings, model, handler, _ = live
    async with broker(ns.amqp_url) as connection:
        producer = await RawProducer.open(connection, Topology(ns.names))
        body = JobRequest(model=model, payload="again", deadline=time.time() + 30)
        job = await producer.publish(body.model_dump_json().encode(), model=model)
        first = await producer.reply(job)
        assert isinstance(first, ErrorReply)
        await wait_errors(ns, 1)

        handler.broken = False
        outcome = await replay_errors(settings, Selection(job_ids=frozenset({job})),
                                      keep_reply_to=True)  # fmt: skip
        assert [j.job_id for j in outcome.replayed] == [job]
        assert outcome.removed == 1
        await wait_for(lambda: len(producer.replies.get(job, [])) == 2, what="the second reply")
        second = producer.replies[job][1]
        assert isinstance(second, ResultReply)
        assert second.result == {"echo": "again"}
    await expect_errors(ns, 0)


async def test_a_replayed_job_is_fresh(ns: Namespace) -> None:
    model = ns.model()
    job = await dead_letter(ns, model=model, reason="expired", error="late", payload=[1, 2],
                            reply_to="amq.rabbitmq.reply-to.gone")  # fmt: skip
    await wait_errors(ns, 1)
    async with ErrorQueue.open(ns.settings()) as errors:
        (copy,) = await errors.scan()
        now = time.time()
        message = replay_message(copy, timeout_s=45, keep_reply_to=False, now=now)
    headers = message.headers or {}
    assert message.message_id == job and message.correlation_id == job
    assert message.reply_to is None  # its producer is gone
    assert message.expiration == 45
    assert headers[DEADLINE_HEADER] == round((now + 45) * 1000)
    for stale in (REASON_HEADER, ERROR_HEADER, MODEL_HEADER):
        assert stale not in headers
    assert headers[REPLAYED_HEADER] == 1
    body = JobRequest.model_validate_json(message.body)
    assert body.deadline == pytest.approx(now + 45)
    assert body.payload == [1, 2] and body.model == model
    await expect_errors(ns, 1)  # building it removed nothing


async def test_replay_publishes_a_job_once_and_removes_every_copy(ns: Namespace) -> None:
    model = ns.model()
    job = uuid.uuid4().hex
    for _ in range(2):  # at-least-once dead-lettering can leave two copies
        await dead_letter(ns, model=model, reason="worker_error", error="x", job_id=job)
    await wait_errors(ns, 2)
    async with broker(ns.amqp_url) as connection:
        channel = await connection.channel()
        await Topology(ns.names).declare_base(channel)
        probe = await channel.declare_queue(exclusive=True)
        await probe.bind(ns.names.unroutable)  # the model is not routable: jobs land here
        outcome = await replay_errors(ns.settings(), Selection(job_ids=frozenset({job})))
        assert [j.job_id for j in outcome.replayed] == [job]
        assert outcome.removed == 2
        arrived = await probe.get(no_ack=True, timeout=5)
        assert arrived.message_id == job and arrived.routing_key == model
        await asyncio.sleep(0.3)
        assert await probe.get(no_ack=True, fail=False) is None  # published once
    await expect_errors(ns, 0)


# --- purge --------------------------------------------------------------------------------------


async def test_purge_removes_only_the_chosen_jobs(ns: Namespace, run: Cli) -> None:
    m1, m2 = ns.model(), ns.model()
    a = await dead_letter(ns, model=m1, reason="no_worker", error="a", age_s=50)
    b = await dead_letter(ns, model=m1, reason="worker_error", error="b", age_s=40)
    c = await dead_letter(ns, model=m2, reason="worker_error", error="c", age_s=30)
    d = await dead_letter(ns, model=m2, reason="expired", error="d", age_s=20)
    e = await dead_letter(ns, model=m2, reason="expired", error="e", age_s=10)
    await wait_errors(ns, 5)

    def ids(jobs: list[Any]) -> list[str]:
        return [j.job_id for j in jobs]

    # Without --yes and without a terminal to ask on, nothing happens.
    code, _, err = await run("errors", "purge", a)
    assert code == 2 and "--yes" in err
    code, _, err = await run("errors", "purge", "--yes")
    assert code == 2 and "--all" in err
    await expect_errors(ns, 5)

    code, out, _ = await run("errors", "purge", a, "--yes")
    assert code == 0 and f"purged {a}" in out
    assert ids((await list_errors(ns.settings()))[0]) == [b, c, d, e]

    code, out, _ = await run("errors", "purge", "--reason", "worker_error", "--model", m2, "--yes")
    assert code == 0 and "1 job copy(ies) purged" in out
    assert ids((await list_errors(ns.settings()))[0]) == [b, d, e]

    # A confirmation that says no keeps everything.
    asked: list[list[str]] = []

    def decline(jobs: list[Any]) -> bool:
        asked.append(ids(jobs))
        return False

    kept = await purge_errors(ns.settings(), Selection(everything=True), confirm=decline)
    assert kept == [] and asked == [[b, d, e]]
    await expect_errors(ns, 3)

    code, out, _ = await run("errors", "purge", "--all", "--reason", "expired", "--yes")
    assert code == 0 and f"purged {d}" in out and f"purged {e}" in out
    assert ids((await list_errors(ns.settings()))[0]) == [b]
    code, _, err = await run("errors", "purge", "nothing-like-this", "--yes")
    assert code == 1 and error_of(err)["error"] == "NOT_FOUND"
    await expect_errors(ns, 1)

    async def accept(jobs: list[Any]) -> bool:  # a confirmation may be asynchronous
        return ids(jobs) == [b]

    purged = await purge_errors(ns.settings(), Selection(job_ids=frozenset({b})), confirm=accept)
    assert ids(purged) == [b]
    await expect_errors(ns, 0)
