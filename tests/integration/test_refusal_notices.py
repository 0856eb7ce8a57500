"""A worker whose heartbeats a controller refuses says why in its log (issue 11): the controller
tells it over ``{ns}.control`` (modelfleet.notices)."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack

import pytest

from modelfleet.controller import Controller
from modelfleet.handlers import echo
from modelfleet.worker import Worker
from tests.conftest import Namespace
from tests.helpers import wait_for
from tests.integration.support import wait_routable


async def test_a_worker_over_the_models_cap_logs_why_its_queue_stays_unbound(
    ns: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = ns.model("first"), ns.model("second")
    settings = ns.settings(routing={"max_models": 1})
    caplog.set_level(logging.WARNING, logger="modelfleet.worker")
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(Controller(settings))
        await stack.enter_async_context(
            Worker(echo, [first], settings=settings, worker_id="w1", install_signal_handlers=False)
        )
        await wait_routable(controller, first)
        refused = await stack.enter_async_context(
            Worker(echo, [second], settings=settings, worker_id="w2", install_signal_handlers=False)
        )
        await wait_for(lambda: refused.refusal is not None, what="the refusal notice")
        assert refused.refusal is not None and refused.refusal.cause == "models_cap"
        assert second in refused.refusal.message
        lines = [
            r.getMessage() for r in caplog.records if "refuses its heartbeats" in r.getMessage()
        ]
        assert len(lines) == 1 and "routing.max_models" in lines[0] and "w2" in lines[0]
        # The worker inside the cap heard nothing.
        assert controller.models_status()[0]["name"] == first


async def test_a_worker_whose_user_is_not_allowed_hears_it(ns: Namespace) -> None:
    model = ns.model()
    controller_settings = ns.settings(security={"heartbeat_users": ["someone-else"]})
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(Controller(controller_settings))
        worker = await stack.enter_async_context(
            Worker(echo, [model], settings=ns.settings(), install_signal_handlers=False)
        )
        await wait_for(lambda: worker.refusal is not None, what="the refusal notice")
        assert worker.refusal is not None and worker.refusal.cause == "user"
        assert "security.heartbeat_users" in worker.refusal.message
