"""Least privilege and spoofing on a real RabbitMQ.

``modelfleet permissions --apply`` creates a controller, a worker and a producer user (a unique
prefix per test, all three deleted at teardown); real connections then show what each may not
do, and that the whole flow still works with one user per role. Heartbeats carry the AMQP
``user_id``: the broker refuses a forged one, and the controller keeps heartbeats only from
``security.heartbeat_users``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractQueue

from modelfleet import cli
from modelfleet.client import Client
from modelfleet.config import Settings
from modelfleet.controller import Controller
from modelfleet.errors import BrokerError, NoWorkerError, WorkerError
from modelfleet.jobs import Job
from modelfleet.permissions import ROLES, grants
from modelfleet.security import amqp_user
from modelfleet.topology import Topology
from modelfleet.worker import Worker
from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.integration.support import ErrorQueue, broker, header, metric, wait_routable


def _rabbitmqctl() -> str:
    path = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    if not shutil.which(path):
        pytest.fail(
            "these tests create RabbitMQ users with rabbitmqctl on the test broker's host; "
            "install rabbitmq-server (or run the tests where rabbitmqctl reaches the broker)"
        )
    return path


def _with_login(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class Users:
    namespace: str
    prefix: str
    passwords: dict[str, str]
    amqp_url: str
    script: str

    def user(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def url(self, role: str) -> str:
        return _with_login(self.amqp_url, self.user(role), self.passwords[role])


@pytest.fixture
async def users(
    ns: Namespace,
    amqp_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> AsyncIterator[Users]:
    """The three users of ``ns``, made by ``modelfleet permissions --apply``; deleted after."""
    ctl = _rabbitmqctl()
    prefix = f"mft-{uuid.uuid4().hex[:8]}"
    passwords = {role: uuid.uuid4().hex for role in ROLES}
    for role, password in passwords.items():
        monkeypatch.setenv(f"MODELFLEET_PASSWORD_{role.upper()}", password)
    # Its own settings file: the test does not depend on the checkout's config/settings.toml.
    config = tmp_path / "settings.toml"
    config.write_text(f'namespace = "{ns.name}"\n[amqp]\nurl = "{amqp_url}"\n')
    args = ["permissions", "--apply", "--prefix", prefix, "--rabbitmqctl", ctl]
    try:
        code = await asyncio.to_thread(cli.main, [*args, "--config", str(config)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        yield Users(ns.name, prefix, passwords, amqp_url, captured.out)
    finally:
        for role in ROLES:
            await asyncio.to_thread(
                subprocess.run,
                [ctl, "delete_user", f"{prefix}-{role}"],
                capture_output=True,
                timeout=60,
                check=False,
            )


async def _ignore(message: AbstractIncomingMessage) -> None:
    return None


def _refused(exc: BaseException, code: str, name: str) -> bool:
    text = str(exc)
    return code in text and name in text


async def test_apply_creates_the_users_with_the_printed_permissions(users: Users) -> None:
    # Passwords came from the environment: the script refers to them, never shows them.
    for password in users.passwords.values():
        assert password not in users.script
    ctl = _rabbitmqctl()
    listing = await asyncio.to_thread(
        subprocess.run,
        [ctl, "-q", "list_permissions", "-p", "/", "--formatter", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    actual = {row["user"]: row for row in json.loads(listing.stdout)}
    for grant in grants(users.namespace, users.prefix):
        row = actual[grant.user]
        assert (row["configure"], row["write"], row["read"]) == (
            grant.configure,
            grant.write,
            grant.read,
        )
        assert f"applied: permissions of {grant.user}" in users.script
    # Each user logs in with its password.
    for role in ROLES:
        connection = await aio_pika.connect(users.url(role))
        await connection.close()


async def _declared(ns: Namespace, model: str) -> None:
    """What a controller declares (as the broker's admin, guest)."""
    async with broker(ns.amqp_url) as admin:
        channel = await admin.channel()
        topology = Topology(ns.names)
        await topology.declare_base(channel)
        await topology.declare_model_queue(channel, model)


async def test_a_producer_cannot_publish_heartbeats_nor_consume_model_queues(
    ns: Namespace, users: Users
) -> None:
    model = ns.model()
    await _declared(ns, model)
    async with broker(users.url("producer")) as producer:
        # Publishing a heartbeat (announcing a worker) is refused.
        channel = await producer.channel(publisher_confirms=True)
        heartbeats = await channel.get_exchange(ns.names.heartbeats)  # passive: allowed
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as refused:
            await heartbeats.publish(aio_pika.Message(b"{}"), routing_key="")
        assert _refused(refused.value, "ACCESS_REFUSED", ns.names.heartbeats)

        # So is taking jobs from a model queue, by consume or by get.
        channel = await producer.channel()
        queue = await channel.declare_queue(ns.names.model_queue(model), passive=True)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as refused:
            await queue.consume(_ignore)
        assert _refused(refused.value, "ACCESS_REFUSED", ns.names.model_queue(model))
        channel = await producer.channel()
        queue = await channel.declare_queue(ns.names.model_queue(model), passive=True)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await queue.get(no_ack=True, fail=False)

        # And publishing straight into a queue through the default exchange.
        channel = await producer.channel(publisher_confirms=True)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as refused:
            await channel.default_exchange.publish(
                aio_pika.Message(b"{}"), routing_key=ns.names.model_queue(model)
            )
        assert _refused(refused.value, "ACCESS_REFUSED", "amq.default")

        # It may not declare (or so redefine) the namespace either...
        channel = await producer.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await Topology(ns.names).declare_jobs(channel)

        # ... but publishing a job and reading replies on direct reply-to is its job.
        channel = await producer.channel(publisher_confirms=True)
        replies = await channel.declare_queue("amq.rabbitmq.reply-to", passive=True)
        await replies.consume(_ignore, no_ack=True)
        jobs = await channel.get_exchange(ns.names.jobs)
        await jobs.publish(
            aio_pika.Message(b"{}", reply_to="amq.rabbitmq.reply-to"), routing_key=model
        )


async def test_a_worker_cannot_bind_queues_to_the_jobs_exchange(
    ns: Namespace, users: Users
) -> None:
    model = ns.model()
    await _declared(ns, model)
    async with broker(users.url("worker")) as worker:
        channel = await worker.channel()
        queue = await Topology(ns.names).declare_model_queue(channel, model)  # allowed
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as refused:
            await queue.bind(ns.names.jobs, routing_key=model)
        assert "ACCESS_REFUSED" in str(refused.value)

        # Nor publish jobs, nor declare or delete the namespace's exchanges.
        channel = await worker.channel(publisher_confirms=True)
        jobs = await channel.get_exchange(ns.names.jobs)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await jobs.publish(aio_pika.Message(b"{}"), routing_key=model)
        channel = await worker.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await channel.exchange_delete(ns.names.jobs)

    # The binding really is not there: the model is still unroutable.
    async with broker(ns.amqp_url) as admin:
        channel = await admin.channel()
        probe = await channel.declare_queue(exclusive=True)
        await probe.bind(ns.names.unroutable)
        jobs = await channel.get_exchange(ns.names.jobs)
        await jobs.publish(aio_pika.Message(b"x"), routing_key=model)
        arrived = await _get_within(probe, 5.0)
        assert arrived is not None and arrived.routing_key == model


async def test_a_worker_login_cannot_read_the_controllers_queues(
    ns: Namespace, users: Users
) -> None:
    """Issue 12, item 3: the worker role's read rule matched ``NS.controller.<id>`` (the id is
    public on /healthz), so a leaked worker login could consume or purge the controller's
    heartbeats. Now the broker refuses both; the controller keeps hearing its probe."""
    settings = ns.settings(amqp={"url": users.url("controller")})
    async with Controller(settings) as controller:
        targets = [
            ns.names.controller_queue(controller.instance),
            ns.names.dead_tap(controller.instance),
            ns.names.errors,
            ns.names.unroutable,
        ]
        async with broker(users.url("worker")) as worker:
            for name in targets:
                channel = await worker.channel()
                queue = await channel.get_queue(name, ensure=False)
                with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                    await queue.consume(_ignore)
                channel = await worker.channel()
                queue = await channel.get_queue(name, ensure=False)
                with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                    await queue.purge()
        assert controller.healthy or controller.listen_only


async def _get_within(queue: AbstractQueue, seconds: float) -> AbstractIncomingMessage | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.05)
    return None


async def echo(job: Job) -> Any:
    if job.payload == "boom":
        raise RuntimeError("boom")
    return job.payload


async def stream_words(job: Job) -> Any:
    for word in str(job.payload).split():
        yield word


async def test_the_whole_flow_works_with_one_user_per_role(ns: Namespace, users: Users) -> None:
    model, streaming = ns.model(), ns.model("s")
    controller_settings = ns.settings(
        amqp={"url": users.url("controller")},
        security={"heartbeat_users": [users.user("worker")]},
    )
    worker_settings = ns.settings(amqp={"url": users.url("worker")})
    producer_settings = ns.settings(amqp={"url": users.url("producer")})
    async with Controller(controller_settings) as controller:
        worker = Worker(
            echo, [model], settings=worker_settings, worker_id="w1", install_signal_handlers=False
        )
        streamer = Worker(
            stream_words,
            [streaming],
            settings=worker_settings,
            worker_id="w2",
            install_signal_handlers=False,
        )
        async with worker, streamer, Client(producer_settings) as client:
            await wait_routable(controller, model)
            await wait_routable(controller, streaming)
            # Heartbeats came with the worker's own user_id, which the controller allows.
            assert metric(controller, "modelfleet_heartbeats_invalid_total", {"cause": "user"}) == 0

            assert await client.submit(model, {"n": 1}) == {"n": 1}
            results = await asyncio.gather(*(client.submit(model, i) for i in range(20)))
            assert results == list(range(20))
            stream = client.stream(streaming, "least privilege works")
            assert await stream.collect() == ["least", "privilege", "works"]

            # Failures still reach the producer and the error queue (worker's dead copy).
            with pytest.raises(WorkerError, match="boom"):
                await client.submit(model, "boom")
            # NO_WORKER comes from the controller over the default exchange.
            with pytest.raises(NoWorkerError):
                await client.submit(ns.model("none"), 1, timeout=5)

        async with broker(ns.amqp_url) as admin:
            errors = await ErrorQueue.open(admin, Topology(ns.names))
            failed = await errors.wait_count(2)
            assert {header(m, "x-mf-reason") for m in failed} == {"worker_error", "no_worker"}


async def test_least_privileged_clients_need_a_controller_first(
    ns: Namespace, users: Users
) -> None:
    # Nothing is declared yet, and neither a producer nor a worker may declare it.
    with pytest.raises(BrokerError, match="start a controller first"):
        async with Client(ns.settings(amqp={"url": users.url("producer")})):
            pass
    worker = Worker(
        echo,
        [ns.model()],
        settings=ns.settings(amqp={"url": users.url("worker")}),
        install_signal_handlers=False,
    )
    with pytest.raises(BrokerError, match="start a controller first"):
        await worker.start()
    await worker.stop()
    assert worker._connection is None  # the failed start closed its connection itself


async def test_least_privileged_users_can_tell_that_no_controller_serves_the_namespace(
    ns: Namespace, users: Users
) -> None:
    """The producer's and worker's look at ``{ns}.unroutable`` (a passive declaration) works with
    the permissions their roles get: a producer fails a job at once with a named NO_WORKER,
    and a worker sees the missing controller (it logs why its queue stays unbound)."""
    model = ns.model()
    # A controller declares the namespace, then stops: nobody serves it any more.
    async with Controller(ns.settings(amqp={"url": users.url("controller")})):
        pass
    worker = Worker(
        echo,
        [model],
        settings=ns.settings(amqp={"url": users.url("worker")}),
        install_signal_handlers=False,
    )
    async with worker, Client(ns.settings(amqp={"url": users.url("producer")})) as client:
        began = time.monotonic()
        with pytest.raises(NoWorkerError, match="no controller serves namespace") as caught:
            await client.submit(ns.model("nobody"), {}, timeout=30)
        assert time.monotonic() - began < 5, "failed at once, not at its 30 s deadline"
        assert repr(ns.name) in str(caught.value)
        await wait_for(
            lambda: worker.controllers.absent_since is not None,
            what="the worker's look finding no controller",
        )


# --- heartbeat user_id --------------------------------------------------------------------------


def _heartbeat_body(worker_id: str, model: str) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "worker_id": worker_id,
            "models": [model],
            "concurrency": 1,
            "sent_at": time.time(),
            "interval_s": 0.25,
        }
    ).encode()


async def _publish_heartbeat(
    connection: AbstractConnection, ns: Namespace, body: bytes, **properties: Any
) -> None:
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(ns.names.heartbeats)
    await exchange.publish(aio_pika.Message(body, **properties), routing_key="")
    await channel.close()


def _user_drops(controller: Controller) -> float:
    return metric(controller, "modelfleet_heartbeats_invalid_total", {"cause": "user"})


async def test_heartbeats_from_users_not_allowed_are_dropped(ns: Namespace) -> None:
    model = ns.model()
    settings = ns.settings(security={"heartbeat_users": ["fleet-worker"]})
    async with Controller(settings) as controller:
        worker = Worker(echo, [model], settings=settings, worker_id="w-guest",
                        install_signal_handlers=False)  # fmt: skip
        async with worker:  # logs in as guest, and says so in user_id
            await wait_for(lambda: _user_drops(controller) >= 3, what="dropped heartbeats")
        assert "w-guest" not in controller.registry
        assert not controller.routing.routable(model)
        # No user_id at all is no better.
        async with broker(ns.amqp_url) as admin:
            before = _user_drops(controller)
            await _publish_heartbeat(admin, ns, _heartbeat_body("anonymous", model))
            await wait_for(lambda: _user_drops(controller) > before, what="anonymous dropped")
        assert "anonymous" not in controller.registry
        assert metric(controller, "modelfleet_heartbeats_received_total") == 0


async def test_heartbeats_from_an_allowed_user_are_accepted(ns: Namespace) -> None:
    model = ns.model()
    guest = amqp_user(ns.amqp_url)
    assert guest is not None
    settings = ns.settings(security={"heartbeat_users": ["fleet-worker", guest]})
    async with Controller(settings) as controller:
        worker = Worker(echo, [model], settings=settings, worker_id="w-ok",
                        install_signal_handlers=False)  # fmt: skip
        async with worker, Client(settings) as client:
            await wait_routable(controller, model)
            assert "w-ok" in controller.registry
            assert await client.submit(model, "hi") == "hi"
        assert _user_drops(controller) == 0


async def test_a_forged_user_id_is_refused_by_the_broker(ns: Namespace) -> None:
    model = ns.model()
    settings = ns.settings(security={"heartbeat_users": ["fleet-worker"]})
    async with Controller(settings) as controller, broker(ns.amqp_url) as guest:
        channel = await guest.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(ns.names.heartbeats)
        forged = aio_pika.Message(_heartbeat_body("impostor", model), user_id="fleet-worker")
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed) as refused:
            await exchange.publish(forged, routing_key="")
        text = str(refused.value)
        assert "PRECONDITION_FAILED" in text
        assert "user_id property set to 'fleet-worker'" in text
        assert channel.is_closed  # the broker closed the publisher's channel
        # Nothing reached the controller: not as a worker, not even as a dropped heartbeat. The
        # controller's own probe travels the same queue: once a probe sent after the refusal is
        # back, anything the forged publish had let through would have arrived before it.
        refused_at = controller.clock()
        await wait_for(
            lambda: (controller._probe_seen_at or 0) > refused_at + settings.heartbeat.interval_s,
            what="a probe sent after the refusal",
        )
        assert "impostor" not in controller.registry
        assert _user_drops(controller) == 0
        assert metric(controller, "modelfleet_heartbeats_received_total") == 0


async def test_worker_heartbeats_carry_the_user_of_its_url(ns: Namespace) -> None:
    model = ns.model()
    settings: Settings = ns.settings()
    seen: list[str | None] = []
    async with broker(ns.amqp_url) as admin:
        channel = await admin.channel()
        exchange = await Topology(ns.names).declare_heartbeats(channel)
        tap = await channel.declare_queue(exclusive=True)
        await tap.bind(exchange)

        async def record(message: AbstractIncomingMessage) -> None:
            seen.append(message.user_id)

        await tap.consume(record, no_ack=True)
        worker = Worker(echo, [model], settings=settings, install_signal_handlers=False)
        async with worker:
            await wait_for(lambda: len(seen) >= 2, what="two heartbeats")
    assert set(seen) == {amqp_user(ns.amqp_url)}


async def test_a_worker_refuses_a_job_whose_reply_to_is_not_direct_reply_to(
    ns: Namespace, amqp_url: str
) -> None:
    """A producer names {ns}.catalog as reply_to: the worker must not write the answer into that
    queue (replies go through the default exchange). The job is refused as invalid before it
    runs, copied to the error queue, and counted in the heartbeat's reply_refused."""
    ran: list[str] = []

    async def handler(job: Job) -> object:
        ran.append(job.job_id)
        return {"hijacked": True}

    settings = ns.settings()
    topology = Topology(ns.names, settings.routing, settings.heartbeat)
    async with AsyncExitStack() as stack:
        connection = await stack.enter_async_context(broker(amqp_url))
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare_base(channel)
        errors = await ErrorQueue.open(connection, topology)
        worker = Worker(handler, ["m"], settings=settings, install_signal_handlers=False)
        await stack.enter_async_context(worker)
        await topology.bind_model(channel, "m")  # routable without a controller
        body = json.dumps({"model": "m", "payload": {"prompt": "x"}}).encode()
        for job_id, reply_to in (("hostile", ns.names.catalog), ("fine", None)):
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    message_id=job_id,
                    correlation_id=job_id,
                    reply_to=reply_to,
                ),
                routing_key=ns.names.model_queue("m"),
            )
        copy = await errors.wait_job("hostile")
        assert header(copy, "x-mf-reason") == "invalid"
        assert "reply_to" in header(copy, "x-mf-error")
        await wait_for(lambda: ran == ["fine"], what="the job without reply_to run")
        assert worker.counters["reply_refused"] == 1
        catalog = await channel.declare_queue(ns.names.catalog, passive=True)
        assert catalog.declaration_result.message_count == 0
