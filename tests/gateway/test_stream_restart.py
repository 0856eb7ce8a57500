"""A streamed answer whose job restarts on another worker mid-stream (its first worker lost its
connection): the gateway cannot take back the text it sent, so it ends the stream with an error
event (STREAM_RESTARTED, 50009) and no ``[DONE]``, and never sends the new attempt's text."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from typing import Any

from modelfleet.worker import Worker
from tests.conftest import Namespace
from tests.gateway.support import stack
from tests.helpers import wait_for
from tests.integration.test_client_recovery import Restarting, close_connection, named


def _content(event: dict[str, Any]) -> str | None:
    content: str | None = event["choices"][0]["delta"].get("content")
    return content


async def test_a_stream_restarted_mid_answer_ends_with_an_error_event(ns: Namespace) -> None:
    model = ns.model()
    handler = Restarting()
    first_settings, first_name = named(ns, "worker-a")
    async with stack(ns) as s, AsyncExitStack() as workers:

        async def add(settings: Any, worker_id: str) -> Worker:
            worker = Worker(
                handler, [model], settings=settings, worker_id=worker_id,
                install_signal_handlers=False,
            )  # fmt: skip
            return await workers.enter_async_context(worker)

        await add(first_settings, "a")
        workers.callback(handler.hang.set)  # the first attempt ends before its worker stops
        await s.wait_routable(model)

        events: list[str] = []
        body = {"model": model, "messages": [{"role": "user", "content": "x"}], "stream": True}
        async with s.http().stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            async for line in lines:
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
                if len(events) == 2:
                    break
            await add(s.settings, "b")  # idle: the broker hands it the job again
            await asyncio.to_thread(close_connection, first_name)
            async for line in lines:
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])

        texts = [_content(json.loads(event)) for event in events[:-1]]
        assert texts == ["a0", "a1"]  # nothing of the new attempt
        error = json.loads(events[-1])["error"]
        assert error["code"] == 50009
        assert "restarted" in error["message"]
        assert "[DONE]" not in events
        # The new attempt is cancelled on its worker, not left running for nobody.
        await wait_for(lambda: handler.cancelled != [], timeout=5, what="the new attempt cancelled")
