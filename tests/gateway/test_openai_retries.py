"""The official ``openai`` client at its DEFAULT settings (``max_retries=2``) against a real
gateway, controller and workers on the real broker: a failure no retry can fix is one request,
one job, one copy in the error queue and one handler run; a failure that waiting fixes is
retried, as the gateway's ``x-should-retry``/``Retry-After`` headers say."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from modelfleet.gateway import Gateway
from modelfleet.handlers import fake_llm
from modelfleet.jobs import Job
from modelfleet.topology import REASON_HEADER, Topology
from tests.conftest import Namespace
from tests.gateway.support import Stack, stack
from tests.integration.support import ErrorQueue, broker, header

MESSAGES: Any = [{"role": "user", "content": "hello?"}]


@asynccontextmanager
async def default_client(s: Stack) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(base_url=f"{s.url}/v1", api_key="unused", timeout=20.0)
    assert client.max_retries == 2  # the package's default, untouched
    try:
        yield client
    finally:
        await client.close()


@asynccontextmanager
async def error_queue(ns: Namespace) -> AsyncIterator[ErrorQueue]:
    async with broker(ns.amqp_url) as connection:
        yield await ErrorQueue.open(connection, Topology(ns.names))


def served(gateway: Gateway | None, endpoint: str) -> float:
    """Requests the gateway answered on ``endpoint``, whatever their status."""
    assert gateway is not None
    return sum(
        sample.value
        for family in gateway.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "modelfleet_gateway_requests_total"
        and sample.labels["endpoint"] == endpoint
    )


def job_of(message: str) -> str:
    found = re.search(r"job=([0-9a-f]{32})", message)
    assert found is not None, message
    return found.group(1)


async def test_unknown_model_is_one_request_one_error_copy(ns: Namespace) -> None:
    model = ns.model("ghost")
    async with stack(ns) as s, default_client(s) as client, error_queue(ns) as errors:
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model=model, messages=MESSAGES)
        assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
        assert served(s.gateway, "/v1/chat/completions") == 1
        job_id = job_of(info.value.message)
        copies = await errors.wait_count(1)
        assert [c.message_id for c in copies] == [job_id]
        assert header(copies[0], REASON_HEADER) == "no_worker"


async def test_known_model_without_worker_is_not_retried_either(ns: Namespace) -> None:
    model = ns.model("gone")
    async with stack(ns) as s:
        leaving = await s.add_worker(fake_llm, model)
        await leaving.stop()
        await s.wait_routable(model, routable=False)
        async with default_client(s) as client, error_queue(ns) as errors:
            with pytest.raises(openai.InternalServerError) as info:
                await client.chat.completions.create(model=model, messages=MESSAGES)
            assert info.value.status_code == 503  # which the client retries, unless told not to
            assert info.value.response.headers["retry-after"] == "10"
            assert served(s.gateway, "/v1/chat/completions") == 1
            copies = await errors.wait_count(1)
            assert [c.message_id for c in copies] == [job_of(info.value.message)]


async def test_a_raising_handler_runs_once(ns: Namespace) -> None:
    model = ns.model("raises")
    runs: list[str] = []

    async def raises(job: Job) -> Any:
        runs.append(job.job_id)
        raise RuntimeError("the model is broken")

    async with stack(ns) as s, error_queue(ns) as errors:
        await s.add_worker(raises, model)
        async with default_client(s) as client:
            with pytest.raises(openai.InternalServerError) as info:
                await client.chat.completions.create(model=model, messages=MESSAGES)
        assert info.value.status_code == 500
        assert "the model is broken" in info.value.message
        assert served(s.gateway, "/v1/chat/completions") == 1
        job_id = job_of(info.value.message)
        copies = await errors.wait_count(1)
        assert [c.message_id for c in copies] == [job_id]
        assert header(copies[0], REASON_HEADER) == "worker_error"
        assert runs == [job_id]


async def test_a_failure_that_waiting_fixes_is_retried(ns: Namespace) -> None:
    """The controller's status API down: 503 with x-should-retry true and Retry-After 1, so the
    client asks three times (once and twice more) before it gives up."""
    async with stack(ns) as s, default_client(s) as client:
        await s.controller_service.server.stop()
        with pytest.raises(openai.InternalServerError) as info:
            await client.models.list()
        assert info.value.status_code == 503
        assert info.value.response.headers["x-should-retry"] == "true"
        assert info.value.response.headers["retry-after"] == "1"
        assert served(s.gateway, "/v1/models") == 3
