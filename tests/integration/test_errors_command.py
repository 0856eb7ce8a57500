"""``modelfleet errors ...`` explains itself: job id prefixes, listings that change nothing and
are ordered by age, replays that say what became of the job, help for every option, and one
failure format. Each test drives the real command against the real broker, in its own namespace.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from modelfleet import cli
from modelfleet.client import Client
from modelfleet.config import Settings
from modelfleet.errors import WorkerError
from modelfleet.errors_admin import KNOWN_REASONS, RETURNS_WARNING, list_errors, parse_version
from modelfleet.jobs import Job
from modelfleet.topology import Topology
from modelfleet.worker import Worker
from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.integration.support import broker, ready_count, wait_routable
from tests.integration.test_errors_admin import (
    Cli,
    config_file,
    dead_letter,
    error_of,
    expect_errors,
    rejected_by_broker,
    wait_errors,
)


@pytest.fixture
def run(ns: Namespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(config_file(tmp_path, ns.settings()), capsys)


def table_without_ages(out: str) -> list[list[str]]:
    """The rows of ``errors list``'s table, cells split on the column gaps, AGE left out (it
    grows by itself)."""
    rows = [re.split(r"\s{2,}", line) for line in out.split("\n\n")[0].splitlines()]
    assert rows[0][3] == "AGE"
    return [row[:3] + row[4:] for row in rows]


def without_age(document: Any) -> Any:
    """A listing or a show document with every ``age_s`` removed (it grows by itself)."""
    if isinstance(document, dict):
        return {k: without_age(v) for k, v in document.items() if k != "age_s"}
    if isinstance(document, list):
        return [without_age(v) for v in document]
    return document


async def declare_base(ns: Namespace) -> None:
    """The namespace's exchanges and queues, as any modelfleet process declares them."""
    async with broker(ns.amqp_url) as connection:
        await Topology(ns.names).declare_base(await connection.channel())


# --- 1. job id prefixes ---------------------------------------------------------------------------


async def test_show_replay_and_purge_take_a_unique_prefix(ns: Namespace, run: Cli) -> None:
    model = ns.model()
    shared = uuid.uuid4().hex[:8]
    x = await dead_letter(
        ns, model=model, reason="worker_error", error="x", job_id=shared + "a" * 24
    )
    y = await dead_letter(
        ns, model=model, reason="worker_error", error="y", job_id=shared + "b" * 24
    )
    z = await dead_letter(ns, model=model, reason="expired", error="z", payload="zed")
    short = await dead_letter(ns, model=model, reason="expired", error="s", job_id="job-1")
    await wait_errors(ns, 4)

    code, out, _ = await run("errors", "show", z[:6])
    assert code == 0 and f"job {z} in {ns.names.errors}" in out
    assert x not in out and y not in out
    code, out, _ = await run("errors", "show", shared + "a")
    assert code == 0 and f"job {x} in" in out
    code, out, _ = await run("errors", "show", "job-1")  # an exact id, however short
    assert code == 0 and f"job {short} in" in out

    # Ambiguous: refused, every candidate named.
    code, _, err = await run("errors", "show", shared)
    assert code == 2
    failure = error_of(err)
    assert failure["error"] == "USAGE" and failure["queue"] == ns.names.errors
    assert f"{shared!r} is ambiguous" in failure["message"]
    assert x in failure["message"] and y in failure["message"]
    # Too short to be a prefix.
    code, _, err = await run("errors", "show", z[:4])
    assert code == 2 and "at least 6 characters" in error_of(err)["message"]
    # Nothing starts with it: NOT_FOUND.
    code, _, err = await run("errors", "show", "zzzzzzzz")
    assert code == 1
    assert error_of(err)["error"] == "NOT_FOUND"
    assert f"no job id in {ns.names.errors} starts with 'zzzzzzzz'" in error_of(err)["message"]

    # purge: one good prefix and one that names nothing: nothing is purged.
    code, _, err = await run("errors", "purge", shared + "a", "zzzzzzzz", "--yes")
    assert code == 1 and error_of(err)["error"] == "NOT_FOUND"
    await expect_errors(ns, 4)
    code, out, _ = await run("errors", "purge", shared + "a", "--yes")
    assert code == 0 and f"purged {x} " in out
    await expect_errors(ns, 3)

    # replay: a prefix, the job replayed under its whole id.
    await declare_base(ns)
    code, out, _ = await run("errors", "replay", z[:10])
    assert code == 0, out
    assert f"replayed {z} to model {model} as job {z}" in out
    await expect_errors(ns, 2)
    remaining = {j.job_id for j in (await list_errors(ns.settings()))[0]}
    assert remaining == {y, short}


# --- 2. listing changes nothing -----------------------------------------------------------------


async def test_listing_twice_prints_the_same_jobs_and_numbers(ns: Namespace, run: Cli) -> None:
    llama = ns.model("llama")
    jobs = [
        await dead_letter(ns, model=llama, reason="worker_error", error="boom", age_s=120),
        await dead_letter(ns, model=llama, reason="no_worker", error="nobody", age_s=70),
        await rejected_by_broker(ns, llama),
    ]
    await wait_errors(ns, 3)

    code, first, _ = await run("errors", "list")
    assert code == 0
    await expect_errors(ns, 3)  # all handed back
    code, second, _ = await run("errors", "list")
    assert code == 0
    assert table_without_ages(second) == table_without_ages(first)
    assert [row[0] for row in table_without_ages(first)[1:]] == jobs
    assert all(row[3] == "0" for row in table_without_ages(first)[1:])  # REPLAYED

    await expect_errors(ns, 3)
    code, first_json, _ = await run("errors", "list", "--json")
    await expect_errors(ns, 3)
    code, second_json, _ = await run("errors", "list", "--json")
    assert without_age(json.loads(second_json)) == without_age(json.loads(first_json))
    await expect_errors(ns, 3)
    code, shown, _ = await run("errors", "show", jobs[0], "--json")
    await expect_errors(ns, 3)
    code, shown_again, _ = await run("errors", "show", jobs[0], "--json")
    assert without_age(json.loads(shown_again)) == without_age(json.loads(shown))
    await expect_errors(ns, 3)


async def test_the_delivery_limit_warning_needs_a_broker_that_drops_returned_copies(
    ns: Namespace, run: Cli
) -> None:
    model = ns.model()
    job = await dead_letter(ns, model=model, reason="worker_error", error="boom")
    await wait_errors(ns, 1)
    # Return the copy often, as many listings would: the broker counts every return.
    async with broker(ns.amqp_url) as connection:
        underlay = connection.transport
        assert underlay is not None
        version = parse_version(underlay.connection.server_properties["version"])
        channel = await connection.channel()
        queue = await channel.declare_queue(ns.names.errors, passive=True)
        for _ in range(RETURNS_WARNING):
            message = await queue.get(no_ack=False, timeout=5)
            await message.nack(requeue=True)
    jobs, _ = await list_errors(ns.settings())
    assert [j.job_id for j in jobs] == [job]
    assert jobs[0].broker_returns >= RETURNS_WARNING  # counted, really

    code, out, err = await run("errors", "list", "--json")
    assert code == 0
    document = json.loads(out)
    assert version is not None
    assert document["broker_version"] == ".".join(map(str, version))
    drops = (4, 0) <= version[:2] < (4, 3)  # the broker's default limit counts every return
    assert bool(document["warnings"]) is drops
    assert ("delivery-limit" in err) is drops
    assert document["jobs"][0]["replayed"] == 0  # the broker's count is not the job's


async def test_a_listing_killed_midway_leaves_every_copy_in_the_queue(ns: Namespace) -> None:
    total = 5000
    model = ns.model()
    async with broker(ns.amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        dead = await Topology(ns.names).declare_dead(channel)
        body = b'{"v":1,"model":"%s","payload":null}' % model.encode()
        for start in range(0, total, 500):
            await asyncio.gather(
                *(
                    dead.publish(
                        aio_pika.Message(body, message_id=uuid.uuid4().hex, timestamp=time.time()),
                        routing_key=model,
                    )
                    for _ in range(start, min(start + 500, total))
                )
            )
    await wait_errors(ns, total)

    command = [sys.executable, "-m", "modelfleet", "errors", "list", "--json"]
    command += ["--namespace", ns.name, "--amqp-url", ns.amqp_url]
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with broker(ns.amqp_url) as connection:

            async def holding() -> bool:
                return await ready_count(connection, ns.names.errors) < total - 100

            await wait_for(holding, timeout=30, interval=0.005, what="the listing to hold copies")
            assert proc.returncode is None, "the listing ended before it could be killed"
            proc.kill()  # no clean-up of any kind: the socket just closes
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == -9
    await expect_errors(ns, total)


# --- 3. order by age ----------------------------------------------------------------------------


async def test_list_orders_jobs_by_the_time_they_died(ns: Namespace, run: Cli) -> None:
    model = ns.model()
    old = await dead_letter(ns, model=model, reason="worker_error", error="old", age_s=300)
    recent = await dead_letter(ns, model=model, reason="worker_error", error="new", age_s=10)
    middle = await dead_letter(ns, model=model, reason="no_worker", error="mid", age_s=120)
    # Sent long ago, dead-lettered by the broker just now: it died last.
    late = await rejected_by_broker(ns, model, sent_age_s=1000)
    await wait_errors(ns, 4)

    code, out, _ = await run("errors", "list", "--json")
    assert code == 0
    document = json.loads(out)
    assert document["order"] == "oldest_first"
    assert [j["job_id"] for j in document["jobs"]] == [old, middle, recent, late]
    by_id = {j["job_id"]: j for j in document["jobs"]}
    assert by_id[late]["died_at_source"] == "x-death"
    assert by_id[late]["age_s"] < 60
    assert by_id[old]["died_at_source"] == "sent"

    code, out, _ = await run("errors", "list", "--newest-first", "--limit", "2")
    assert code == 0
    assert [row[0] for row in table_without_ages(out)[1:]] == [late, recent]
    assert "2 shown of 4 matching, by time of death, newest first" in out
    code, out, _ = await run("errors", "list")
    assert [row[0] for row in table_without_ages(out)[1:]] == [old, middle, recent, late]
    assert "oldest first" in out


# --- 4. what became of a replayed job -----------------------------------------------------------


class Picky:
    """Fails everything while broken; fails a poison pill always."""

    def __init__(self) -> None:
        self.broken = True
        self.ran: list[Any] = []

    async def __call__(self, job: Job) -> Any:
        if self.broken:
            raise RuntimeError("weights not loaded")
        if job.payload == "poison":
            raise RuntimeError("poison pill")
        self.ran.append(job.payload)
        return {"echo": job.payload}


@pytest.fixture
async def picky(ns: Namespace) -> AsyncIterator[tuple[Settings, str, Picky]]:
    from modelfleet.controller import Controller

    settings = ns.settings()
    model = ns.model()
    handler = Picky()
    async with Controller(settings) as controller:
        worker = Worker(handler, [model], settings=settings, install_signal_handlers=False)
        async with worker:
            await wait_routable(controller, model)
            yield settings, model, handler


async def test_replay_wait_reports_each_answer(
    ns: Namespace, run: Cli, picky: tuple[Settings, str, Picky]
) -> None:
    settings, model, handler = picky
    failed: dict[str, str] = {}
    async with Client(settings) as client:
        for payload in ("good", "poison"):
            with pytest.raises(WorkerError) as info:
                await client.submit(model, payload)
            failed[payload] = info.value.job_id
    await wait_errors(ns, 2)
    handler.broken = False

    code, out, err = await run("errors", "replay", "--all", "--wait", "--timeout", "20")
    assert code == 1  # one job failed again
    good, poison = failed["good"], failed["poison"]
    assert (
        f"replayed {good} to model {model} as job {good} (was worker_error): answered (ok)" in out
    )
    poison_line = [line for line in out.splitlines() if poison in line]
    assert len(poison_line) == 1, out  # said once, on stdout
    assert poison_line[0].startswith(
        f"replayed {poison} to model {model} as job {poison} (was worker_error): failed again "
        "with WORKER_ERROR: "
    )
    assert "poison pill" in poison_line[0]
    assert "answered ok 1, failed again 1, no answer 0" in out
    # stderr: one summary failure, not the job's failure a second time.
    assert len(err.splitlines()) == 1, err
    assert json.loads(err) == {
        "error": "REPLAY_FAILED",
        "message": "1 of 2 replayed jobs failed again",
    }
    assert handler.ran == ["good"]

    # The poison pill is back in the error queue, counted as replayed once.
    async def back() -> bool:
        jobs, _ = await list_errors(settings)
        return [(j.job_id, j.replayed) for j in jobs] == [(poison, 1)]

    await wait_for(back, timeout=10, what="the poison pill back in the error queue")


async def test_replay_wait_says_when_no_answer_came(ns: Namespace, run: Cli) -> None:
    model = ns.model()  # no worker, no controller: the job waits unrouted
    job = await dead_letter(ns, model=model, reason="no_worker", error="nobody")
    await wait_errors(ns, 1)
    await declare_base(ns)

    started = time.monotonic()
    code, out, err = await run("errors", "replay", job[:8], "--wait", "--timeout", "1", "--json")
    assert code == 1
    assert time.monotonic() - started >= 1.0
    document = json.loads(out)
    (record,) = document["replayed"]
    assert record["job_id"] == job and record["as_job"] == job
    assert record["outcome"] == "no_answer"
    assert record["answer_to"] == "amq.rabbitmq.reply-to"
    assert len(err.splitlines()) == 1, err  # the outcome is in the document: one summary
    assert json.loads(err) == {
        "error": "REPLAY_FAILED",
        "message": "1 of 1 replayed job did not answer within 2s",
    }

    # Its new deadline passed unrouted: the broker dead-letters it again, marked replayed once.
    async def back() -> bool:
        jobs, _ = await list_errors(ns.settings())
        return [(j.job_id, j.reason, j.replayed) for j in jobs] == [(job, "expired", 1)]

    await wait_for(back, timeout=10, what="the expired replay back in the error queue")


async def no_record_copy(ns: Namespace) -> str:
    """A copy in the error queue that records neither reason nor model (no x-mf-* headers, no
    x-death, no routing key): its reason is "unknown", its model cannot be told."""
    job_id = uuid.uuid4().hex
    async with broker(ns.amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        dead = await Topology(ns.names).declare_dead(channel)
        message = aio_pika.Message(b"{}", message_id=job_id, timestamp=time.time())
        await dead.publish(message, routing_key="")
    return job_id


async def test_replay_reports_a_job_it_could_not_replay_once(ns: Namespace, run: Cli) -> None:
    model = ns.model()
    good = await dead_letter(ns, model=model, reason="expired", error="late")
    orphan = await no_record_copy(ns)
    await wait_errors(ns, 2)
    await declare_base(ns)

    code, out, err = await run("errors", "replay", "--all")
    assert code == 1
    assert f"replayed {good} to model {model} as job {good} (was expired)" in out
    orphan_lines = [line for line in out.splitlines() if orphan in line]
    assert len(orphan_lines) == 1, out
    assert orphan_lines[0].startswith(
        f"not replayed {orphan} (model ?, was unknown): INVALID_MODEL"
    )
    assert orphan_lines[0].endswith(f"; left in {ns.names.errors}")
    assert len(err.splitlines()) == 1, err
    assert json.loads(err) == {
        "error": "REPLAY_FAILED",
        "message": f"1 of 2 chosen jobs not replayed, left in {ns.names.errors}",
    }
    await expect_errors(ns, 1)
    remaining, _ = await list_errors(ns.settings())
    assert [j.job_id for j in remaining] == [orphan]


async def test_reason_must_be_one_a_copy_can_have(ns: Namespace, run: Cli) -> None:
    model = ns.model()
    rejected = await rejected_by_broker(ns, model)
    orphan = await no_record_copy(ns)
    await dead_letter(ns, model=model, reason="worker_error", error="boom")
    await wait_errors(ns, 3)

    async def refused(*args: str) -> dict[str, Any]:
        """A command argparse refuses: exit 2 (SystemExit), nothing on stdout, one failure."""
        with pytest.raises(SystemExit) as info:
            await run(*args)
        out, err = run.capsys.readouterr()
        assert (info.value.code, out) == (2, "")
        assert len(err.splitlines()) == 1, err
        failure: dict[str, Any] = json.loads(err)
        return failure

    failure = await refused("errors", "list", "--reason", "bogus")
    assert failure["error"] == "USAGE"
    assert "argument --reason: invalid choice: 'bogus'" in failure["message"]
    for reason in KNOWN_REASONS:
        assert repr(reason) in failure["message"]
    failure = await refused("errors", "purge", "--all", "--reason", "worker-error", "--yes")
    assert failure["error"] == "USAGE"
    await expect_errors(ns, 3)  # nothing purged

    # The broker's reasons and "unknown" are reasons too.
    for reason, job in (("rejected", rejected), ("unknown", orphan)):
        code, out, _ = await run("errors", "list", "--json", "--reason", reason)
        assert code == 0
        assert [j["job_id"] for j in json.loads(out)["jobs"]] == [job]


async def test_replay_says_where_the_answer_goes(ns: Namespace, run: Cli) -> None:
    model = ns.model()
    gone = "amq.rabbitmq.reply-to.gone"
    a = await dead_letter(ns, model=model, reason="expired", error="a", reply_to=gone)
    b = await dead_letter(ns, model=model, reason="expired", error="b", reply_to=gone)
    await wait_errors(ns, 2)
    await declare_base(ns)

    code, out, _ = await run("errors", "replay", a)
    assert code == 0
    assert (
        f"replayed {a} to model {model} as job {a} (was expired); its answer goes nowhere: "
        "the original producer is gone"
    ) in out
    code, out, _ = await run("errors", "replay", b, "--keep-reply-to")
    assert code == 0
    assert (
        f"replayed {b} to model {model} as job {b} (was expired); its answer goes to {gone} "
        "(the original producer's reply-to, --keep-reply-to)"
    ) in out
    await expect_errors(ns, 0)

    code, _, err = await run("errors", "replay", "--all", "--wait", "--keep-reply-to")
    assert code == 2 and error_of(err)["error"] == "USAGE"


# --- 5. help, and one failure format ------------------------------------------------------------


def undocumented(help_text: str) -> list[str]:
    """Options, arguments and actions in an argparse help text that have no help of their own."""
    missing: list[str] = []
    lines = help_text.splitlines()
    in_list = False
    for index, line in enumerate(lines):
        if line in ("options:", "positional arguments:"):
            in_list = True
            continue
        if not line.strip():
            in_list = False
            continue
        indent = len(line) - len(line.lstrip())
        if not in_list or indent not in (2, 4):
            continue
        following = lines[index + 1] if index + 1 < len(lines) else ""
        wrapped = len(following) - len(following.lstrip()) > indent + 4
        if not re.search(r"\S\s{2,}\S", line) and not wrapped:
            missing.append(line.strip())
    return missing


@pytest.mark.parametrize("action", [[], ["list"], ["show"], ["replay"], ["purge"]])
def test_every_action_and_option_has_help(
    action: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["errors", *action, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--json" in text
    assert undocumented(text) == []
    if action == ["replay"]:
        assert "--wait" in text
    if action in (["show"], ["replay"], ["purge"]):
        assert "first 6+ characters" in text


async def test_an_unreachable_broker_is_a_broker_error(ns: Namespace, run: Cli) -> None:
    code, _, err = await run("errors", "list", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/")
    assert code == 3
    failure = error_of(err)
    assert failure["error"] == "BROKER_ERROR"
    assert "cannot connect to RabbitMQ" in failure["message"]
    assert "Traceback" not in err


async def test_a_terminal_gets_one_human_line_and_json_when_asked(ns: Namespace) -> None:
    def on_a_terminal(*extra: str) -> tuple[int, str]:
        primary, secondary = os.openpty()
        command = [sys.executable, "-m", "modelfleet", "errors", "show", "abcdef", *extra]
        command += ["--namespace", ns.name, "--amqp-url", ns.amqp_url]
        with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=secondary) as proc:
            os.close(secondary)
            chunks: list[bytes] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                ready, _, _ = select.select([primary], [], [], 0.1)
                if not ready:
                    if proc.poll() is not None:
                        break
                    continue
                try:
                    chunk = os.read(primary, 4096)
                except OSError:  # EIO: the terminal's other side closed
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            code = proc.wait(10)
        os.close(primary)
        return code, b"".join(chunks).decode().replace("\r\n", "\n")

    code, text = await asyncio.to_thread(on_a_terminal)
    assert code == 1
    assert text.strip() == (
        f"modelfleet: NOT_FOUND: namespace {ns.name!r} has no error queue {ns.names.errors!r}: "
        "is the namespace right (--namespace, the namespace setting or $MODELFLEET_NAMESPACE)? "
        f"The first controller, worker or client creates it (namespace {ns.name})"
    )
    code, text = await asyncio.to_thread(on_a_terminal, "--json")
    assert code == 1
    failure = json.loads(text)
    assert failure["error"] == "NOT_FOUND" and failure["namespace"] == ns.name
