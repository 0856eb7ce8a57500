"""No silent wait for a namespace no controller serves (issue 11), on a real RabbitMQ: the
client's looks at ``{ns}.unroutable`` (modelfleet.presence)."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

import pytest

from modelfleet.client import Client
from modelfleet.controller import Controller
from modelfleet.errors import NoWorkerError
from modelfleet.handlers import echo
from modelfleet.worker import Worker
from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.integration.support import wait_routable


async def test_a_job_for_a_queue_no_controller_bound_fails_at_once(ns: Namespace) -> None:
    """A worker consumes its model's queue, but no controller ever bound it: the job goes to
    ``{ns}.unroutable``, and the client says so at once instead of waiting for its deadline."""
    model = ns.model()
    settings = ns.settings()
    async with AsyncExitStack() as stack:
        # A controller declares the namespace and leaves before the worker comes.
        async with Controller(settings):
            pass
        worker = await stack.enter_async_context(
            Worker(echo, [model], settings=settings, install_signal_handlers=False)
        )
        client = await stack.enter_async_context(Client(settings))
        began = time.monotonic()
        with pytest.raises(NoWorkerError, match="no controller has bound the queue") as caught:
            await client.submit(model, {"x": 1}, timeout=60)
        assert time.monotonic() - began < 5, "at once, not at its 60 s deadline"
        assert repr(ns.name) in str(caught.value)
        assert worker.counters["ok"] == 0


async def test_a_long_lived_client_fails_stranded_jobs_once_the_controller_is_gone_for_good(
    ns: Namespace,
) -> None:
    settings = ns.settings()
    async with Client(settings) as client:
        async with Controller(settings):
            await wait_for(lambda: client.controllers.ever_seen, what="the controller seen")
        await wait_for(
            lambda: client.controllers.absent_since is not None, what="its absence noticed"
        )
        began = time.monotonic()
        with pytest.raises(NoWorkerError, match="no controller serves namespace") as caught:
            await client.submit(ns.model("ghost"), {}, timeout=60)
        waited = time.monotonic() - began
        # Not at the 60 s deadline: within the grace given to a controller that was there.
        assert waited < client.controllers.remember_s + 5, waited
        assert repr(ns.name) in str(caught.value)


async def test_a_controller_back_within_the_grace_answers_what_waited_for_it(
    ns: Namespace,
) -> None:
    model = ns.model()
    settings = ns.settings()
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(Client(settings))
        async with Controller(settings):
            await wait_for(lambda: client.controllers.ever_seen, what="the controller seen")
        await wait_for(
            lambda: client.controllers.absent_since is not None, what="its absence noticed"
        )
        # Sent while no controller runs: it waits in {ns}.unroutable...
        waiting = asyncio.create_task(client.submit(model, {"late": True}, timeout=60))
        await wait_for(lambda: client.pending == 1, what="the job sent")
        # ...and a controller and a worker that come back within the grace serve it.
        controller = await stack.enter_async_context(Controller(settings))
        await stack.enter_async_context(
            Worker(echo, [model], settings=settings, install_signal_handlers=False)
        )
        await wait_routable(controller, model)
        try:
            assert await asyncio.wait_for(waiting, 30) == {"late": True}
        except NoWorkerError as exc:
            # The controller answered it before the worker was routable: also an answer from
            # a controller, not the client's verdict of a missing one.
            assert "no controller" not in str(exc), exc
