"""``modelfleet errors ...`` on entries a producer planted (issue 12).

Anyone who may publish jobs can put entries in ``{ns}.errors``: a job for a model nobody serves
is copied there by the controller as it came (reason no_worker), with its body, message id and
headers. Each test plants its entries that way, through a running controller, and drives the
real command against the real broker. The planting uses the test broker's guest login: it may
publish to ``{ns}.jobs`` as a producer login may, and nothing more is asked of it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractQueue

from modelfleet.controller import Controller
from modelfleet.topology import DEADLINE_HEADER, Topology
from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.integration.support import RawProducer, broker
from tests.integration.test_errors_admin import Cli, config_file, error_of, expect_errors

REPLAYED_HEADER = "x-mf-replayed"
# Deep enough for a RecursionError in any recursive JSON parser or printer.
DEEP = 50_000


@pytest.fixture
def run(ns: Namespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(config_file(tmp_path, ns.settings()), capsys)


@pytest.fixture
async def producer(ns: Namespace) -> AsyncIterator[RawProducer]:
    """A producer publishing to ``{ns}.jobs`` while a controller runs (and no worker)."""
    settings = ns.settings()
    async with Controller(settings), broker(ns.amqp_url) as connection:
        yield await RawProducer.open(connection, Topology(ns.names))


def job_body(model: str, payload: Any = None) -> bytes:
    return json.dumps({"v": 1, "model": model, "payload": payload}).encode()


def deep_body(model: str) -> bytes:
    return b'{"v":1,"model":"%s","payload":%s%s}' % (model.encode(), b"[" * DEEP, b"]" * DEEP)


async def planted(ns: Namespace, *job_ids: str) -> None:
    """Wait until the controller has copied every one of ``job_ids`` to the error queue."""
    wanted = set(job_ids)

    async def there() -> bool:
        async with broker(ns.amqp_url) as connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(ns.names.errors, passive=True)
            seen: set[str] = set()
            while (message := await queue.get(no_ack=False, fail=False)) is not None:
                seen.add(message.message_id or "")
            return wanted <= seen  # closing the channel hands every copy back

    await wait_for(there, timeout=15, interval=0.1, what=f"{len(wanted)} planted entries")
    await expect_errors(ns, len(wanted))


async def tap(ns: Namespace, connection: AbstractConnection, model: str) -> AbstractQueue:
    """A queue of the test's own bound to ``{ns}.jobs`` for ``model``: replays land there."""
    channel = await connection.channel()
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(ns.names.jobs, routing_key=model)
    return queue


async def take(queue: AbstractQueue, count: int) -> list[AbstractIncomingMessage]:
    got: list[AbstractIncomingMessage] = []

    async def enough() -> bool:
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            got.append(message)
        return len(got) >= count

    await wait_for(enough, timeout=10, what=f"{count} replayed jobs")
    return got


async def test_a_deeply_nested_body_is_shown_as_an_excerpt(
    ns: Namespace, run: Cli, producer: RawProducer
) -> None:
    model = ns.model()
    deep = await producer.publish(deep_body(model), model=model)
    await planted(ns, deep)

    code, out, err = await run("errors", "show", deep)
    assert code == 0, err
    assert f"job {deep} in {ns.names.errors}" in out
    assert "broken:    body JSON nested deeper than 100 levels" in out
    assert f"body (text, {len(deep_body(model))} bytes):" in out
    assert len(out) < 5000  # an excerpt, not 100 kB of brackets

    code, out, err = await run("errors", "show", deep, "--json")
    assert code == 0, err
    (document,) = json.loads(out)
    assert document["body_format"] == "text"
    assert document["problem"] == "body JSON nested deeper than 100 levels"

    code, out, err = await run("errors", "list")
    assert code == 0, err
    assert "BROKEN (body JSON nested deeper than 100 levels)" in out
    await expect_errors(ns, 1)


async def test_control_characters_are_escaped_for_a_person(
    ns: Namespace, run: Cli, producer: RawProducer
) -> None:
    model = ns.model()
    evil_model = model + "\x1b[31m"
    evil_id = "evil\x1b[2J\x1b]0;pwned\x07\x9b" + uuid.uuid4().hex
    await producer.publish(
        job_body(evil_model),
        model=evil_model,
        job_id=evil_id,
        headers={"x-note": "\x1b[5mblink\u202e"},
    )
    await planted(ns, evil_id)
    shown_id = "evil\\x1b[2J\\x1b]0;pwned\\x07\\x9b" + evil_id[-32:]

    code, out, err = await run("errors", "list")
    assert code == 0, err
    assert not any(c in out for c in "\x1b\x07\x9b\u202e"), out
    assert shown_id in out and model + "\\x1b[31m" in out
    code, out, err = await run("errors", "show", evil_id)
    assert code == 0, err
    assert not any(c in out for c in "\x1b\x07\x9b\u202e"), out
    assert f"job {shown_id} in" in out
    assert "blink\\u202e" in out
    # JSON stays JSON: the values are what the entry holds.
    code, out, err = await run("errors", "list", "--json")
    assert code == 0, err
    (entry,) = json.loads(out)["jobs"]
    assert (entry["job_id"], entry["model"]) == (evil_id, evil_model)
    assert entry["problem"] == "job id holds control characters"
    await expect_errors(ns, 1)


async def test_replay_rebuilds_our_headers(ns: Namespace, run: Cli, producer: RawProducer) -> None:
    model = ns.model()
    job = await producer.publish(
        job_body(model, "hi"),
        model=model,
        headers={
            REPLAYED_HEADER: 10**12,
            DEADLINE_HEADER: 1,
            "x-mf-rerouted": 1,
            "x-mf-custom": "planted",
            "X-MF-Shouting": "planted",
            "x-trace": "kept",
        },
    )
    await planted(ns, job)
    async with broker(ns.amqp_url) as connection:
        replays = await tap(ns, connection, model)
        code, _, err = await run("errors", "replay", job, "--timeout", "30")
        assert code == 0, err
        (message,) = await take(replays, 1)
    headers = dict(message.headers or {})
    deadline = headers.pop(DEADLINE_HEADER)
    assert isinstance(deadline, int) and deadline > 10**12  # fresh, epoch milliseconds
    assert headers == {"x-trace": "kept", REPLAYED_HEADER: 1}
    assert message.message_id == job
    assert json.loads(message.body)["payload"] == "hi"
    await expect_errors(ns, 0)


async def test_replay_all_and_purge_all_skip_broken_entries(
    ns: Namespace, run: Cli, producer: RawProducer
) -> None:
    model = ns.model()
    deep = await producer.publish(deep_body(model), model=model)
    evil_id = "evil\x1b[2J" + uuid.uuid4().hex
    await producer.publish(job_body(model), model=model, job_id=evil_id)
    good = [await producer.publish(job_body(model, n), model=model) for n in range(2)]
    await planted(ns, deep, evil_id, *good)

    async with broker(ns.amqp_url) as connection:
        replays = await tap(ns, connection, model)
        code, out, err = await run("errors", "replay", "--all", "--timeout", "30")
        assert code == 1, err
        assert sorted(m.message_id or "" for m in await take(replays, 2)) == sorted(good)
    for job in good:
        assert f"replayed {job} to model {model} as job {job}" in out
    skipped = [line for line in out.splitlines() if line.startswith("not replayed ")]
    assert len(skipped) == 2, out
    assert any(
        line.startswith(
            f"not replayed {deep} (model {model}, was no_worker): INVALID_JOB: "
            "broken entry: body JSON nested deeper than 100 levels"
        )
        for line in skipped
    )
    assert any("evil\\x1b[2J" in line and "job id holds control" in line for line in skipped)
    assert "\x1b" not in out
    assert error_of(err) == {
        "error": "REPLAY_FAILED",
        "message": f"2 of 4 chosen jobs not replayed, left in {ns.names.errors}",
    }
    await expect_errors(ns, 2)

    code, out, err = await run("errors", "purge", "--all", "--yes")
    assert code == 1
    assert out.count("skipped ") == 2 and "\x1b" not in out
    assert f"skipped {deep} (model {model}, no_worker): broken entry: body JSON" in out
    assert error_of(err)["error"] == "PURGE_SKIPPED"
    await expect_errors(ns, 2)
    # Named, a broken entry is purged.
    code, out, err = await run("errors", "purge", deep, evil_id, "--yes")
    assert code == 0, err
    await expect_errors(ns, 0)
