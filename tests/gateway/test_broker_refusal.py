"""A gateway whose AMQP user may not publish jobs: each request fails at once with a 502 that
names the exchange and the user, not after its whole timeout with CONNECTION_LOST."""

from __future__ import annotations

import time
from typing import Any

from modelfleet.gateway import Gateway
from modelfleet.jobs import Job
from tests.conftest import Namespace
from tests.gateway.support import gateway_settings, stack
from tests.integration.test_security import Users


async def echo(job: Job) -> Any:
    return {"text": "never"}


async def test_a_job_the_broker_refuses_is_a_502_at_once(ns: Namespace, users: Users) -> None:
    model = ns.model()
    async with stack(ns) as s:
        await s.add_worker(echo, model)
        # The worker role may not publish to {ns}.jobs.
        refused = Gateway(
            gateway_settings(ns, amqp={"url": users.url("worker")}),
            controller_url=s.controller_service.server.url,
        )
        await refused.start()
        try:
            http = s.http()
            for stream in (False, True):
                body = {"model": model, "messages": [{"role": "user", "content": "x"}]}
                began = time.monotonic()
                response = await http.post(
                    f"{refused.url}/v1/chat/completions", json={**body, "stream": stream}
                )
                assert time.monotonic() - began < 2  # the gateway's timeout is 10 s
                assert response.status_code == 502, response.text
                message = response.json()["error"]["message"]
                assert repr(ns.names.jobs) in message
                assert users.user("worker") in message
        finally:
            await refused.stop()
